"""Digit-image classification service: image decoding, validation, pre/post-processing and wiring."""
