"""Deployment sources: the service list (services.yaml) and the generator of the files that follow from it."""
