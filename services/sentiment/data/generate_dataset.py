"""Generate `sentiment.jsonl`, the project's labelled sentiment set (run once; the output is committed).

    python services/sentiment/data/generate_dataset.py

Sentences come from hand-written clauses per domain (product, movie, restaurant, hotel,
app, support ticket, travel, car, book, course, home services) combined into one- and
two-clause reviews, plus hand-written sentences for negation ("not bad at all"),
mixed-but-clear opinions and short posts. About 660 training and 540 held-out sentences:
the held-out set is large enough (>= 500) to tell a 1-point accuracy change of a runtime
variant (INT8, fused graphs) from noise.
The held-out split is made BEFORE composing: each clause and each hand-written sentence
belongs to train or test, so no test sentence shares a clause with a training sentence.
Seeded: the same script writes the same file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 7
TEST_SHARE = 0.3
PER_CLASS = {"train": 22, "test": 21}  # composed sentences per domain, split and label
OUT = Path(__file__).with_name("sentiment.jsonl")

# domain -> (things reviewed, positive clauses, negative clauses); "{it}" is one of the things.
DOMAINS: dict[str, tuple[list[str], list[str], list[str]]] = {
    "product": (
        ["headphones", "blender", "laptop", "vacuum cleaner", "coffee grinder", "backpack", "phone case",
         "air fryer", "keyboard", "desk lamp", "electric kettle", "running shoes"],
        [
            "the {it} arrived a day early and works perfectly",
            "the build quality of the {it} is excellent",
            "I use the {it} every day and it still feels brand new",
            "the {it} was worth every penny",
            "setting up the {it} took two minutes",
            "the battery on the {it} lasts far longer than advertised",
            "my old {it} was never this quiet",
            "the {it} is sturdy, light and looks great on the shelf",
            "I have already ordered a second {it} for my sister",
            "the {it} does exactly what the description promised",
            "customer service replaced a missing part of the {it} within a day",
            "the {it} is easily the best purchase I made this year",
            "the materials of the {it} feel premium",
            "the {it} is comfortable to use for hours",
        ],
        [
            "the {it} stopped working after a week",
            "the {it} arrived with a cracked casing",
            "the {it} is much flimsier than the photos suggest",
            "the {it} makes an awful rattling noise",
            "I returned the {it} the same day",
            "the instructions for the {it} are useless",
            "the {it} overheats after ten minutes",
            "the {it} broke the first time I dropped it",
            "the {it} is a complete waste of money",
            "the seller never answered my questions about the defective {it}",
            "the {it} smells like burning plastic",
            "the buttons on the {it} stick constantly",
            "the {it} feels cheap and poorly made",
            "the charger that came with the {it} died within days",
        ],
    ),
    "movie": (
        ["film", "movie", "sequel", "documentary", "thriller", "animated feature", "series finale"],
        [
            "the {it} kept me on the edge of my seat",
            "the acting in the {it} is superb",
            "the {it} has a beautiful, moving score",
            "I laughed from start to finish during the {it}",
            "the {it} is the most touching story I have seen in years",
            "the cinematography of the {it} is stunning",
            "the {it} rewards a second viewing",
            "the dialogue in the {it} is sharp and witty",
            "the {it} is a delight for the whole family",
            "the ending of the {it} left the audience cheering",
            "the lead gives a career-best performance in the {it}",
            "the {it} is clever, warm and beautifully paced",
        ],
        [
            "the {it} dragged on for far too long",
            "the plot of the {it} makes no sense",
            "I walked out of the {it} halfway through",
            "the acting in the {it} is wooden",
            "the {it} is a lazy cash grab",
            "the jokes in the {it} fall completely flat",
            "the {it} is predictable from the first scene",
            "the special effects in the {it} look cheap",
            "the {it} wasted a talented cast",
            "the dialogue in the {it} is painfully clumsy",
            "I nearly fell asleep during the {it}",
            "the ending of the {it} ruined everything before it",
        ],
    ),
    "restaurant": (
        ["bistro", "pizza place", "sushi bar", "cafe", "steakhouse", "noodle shop", "bakery", "taco truck"],
        [
            "the food at the {it} was fresh and full of flavour",
            "the staff at the {it} made us feel welcome",
            "the {it} serves the best pasta in town",
            "our waiter at the {it} was attentive without hovering",
            "the portions at the {it} are generous",
            "the {it} has a cosy atmosphere and fair prices",
            "every dish we tried at the {it} was delicious",
            "the desserts at the {it} are heavenly",
            "we will definitely go back to the {it}",
            "the {it} handled our large group effortlessly",
            "the coffee at the {it} is rich and smooth",
            "the chef at the {it} clearly cares about every plate",
        ],
        [
            "the food at the {it} was cold and bland",
            "we waited over an hour for our mains at the {it}",
            "the staff at the {it} were rude and dismissive",
            "the {it} was dirty and the tables were sticky",
            "I got food poisoning after eating at the {it}",
            "the {it} is wildly overpriced for what you get",
            "the fish at the {it} tasted off",
            "the {it} got our order wrong twice",
            "the portions at the {it} are tiny",
            "the music at the {it} was so loud we could not talk",
            "the bread at the {it} was stale",
            "we will never set foot in the {it} again",
        ],
    ),
    "hotel": (
        ["hotel", "guesthouse", "resort", "hostel", "apartment we rented", "lodge"],
        [
            "the room at the {it} was spotless",
            "the bed at the {it} was incredibly comfortable",
            "the view from the {it} was breathtaking",
            "the front desk of the {it} upgraded us for free",
            "the breakfast at the {it} had something for everyone",
            "the {it} is in a perfect spot near the old town",
            "the {it} was quiet, so we slept wonderfully",
            "the staff at the {it} went above and beyond",
            "the pool at the {it} was clean and never crowded",
            "the {it} felt like a home away from home",
        ],
        [
            "the room at the {it} smelled of mould",
            "the walls at the {it} are paper thin",
            "the {it} charged us for a minibar we never touched",
            "the shower at the {it} was lukewarm at best",
            "the {it} looks nothing like the pictures",
            "the air conditioning at the {it} did not work",
            "the receptionist at the {it} was unhelpful and rude",
            "there were bugs in the bed at the {it}",
            "the {it} cancelled our booking without telling us",
            "the noise from the street kept us awake all night at the {it}",
        ],
    ),
    "app": (
        ["app", "update", "website", "game", "photo editor", "banking app", "music service"],
        [
            "the {it} is fast and intuitive",
            "the latest version of the {it} fixed every bug I had",
            "the {it} makes my daily routine so much easier",
            "the design of the {it} is clean and friendly",
            "the {it} syncs flawlessly across my devices",
            "the {it} has not crashed once in months",
            "the new dark mode in the {it} looks gorgeous",
            "the {it} is the most useful thing on my phone",
            "the tutorials in the {it} are genuinely helpful",
            "I recommend the {it} to everyone I know",
        ],
        [
            "the {it} crashes every time I open it",
            "the {it} drains my battery in hours",
            "the latest version of the {it} deleted all my data",
            "the {it} is full of annoying ads",
            "the {it} freezes whenever I try to log in",
            "the {it} is slow and confusing",
            "the {it} keeps charging me after I cancelled",
            "the redesign made the {it} unusable",
            "the {it} logs me out constantly",
            "I uninstalled the {it} after one day",
        ],
    ),
    "support": (
        ["support team", "help desk", "agent", "technician", "courier", "billing department"],
        [
            "the {it} solved my problem in a single call",
            "the {it} was patient and explained everything clearly",
            "the {it} followed up the next day to check on me",
            "the {it} refunded me without any hassle",
            "the {it} answered my ticket within minutes",
            "the {it} was friendly and genuinely helpful",
            "the {it} fixed the outage faster than I expected",
            "the {it} went out of their way to help me",
        ],
        [
            "the {it} closed my ticket without fixing anything",
            "the {it} kept me on hold for forty minutes",
            "the {it} never called back as promised",
            "the {it} was condescending and unhelpful",
            "the {it} gave me three different answers to the same question",
            "the {it} charged me twice and refuses to refund it",
            "the {it} ignored my emails for two weeks",
            "the {it} lost my package and blamed me",
        ],
    ),
    "travel": (
        ["flight", "train journey", "ferry crossing", "airline", "bus company", "cruise", "night train"],
        [
            "the {it} left right on schedule",
            "the crew on the {it} were warm and attentive",
            "the seats on the {it} had plenty of legroom",
            "boarding the {it} was quick and painless",
            "the {it} got us there half an hour early",
            "the meals served on the {it} were surprisingly tasty",
            "the {it} was calm and comfortable the whole way",
            "rebooking the {it} after the storm took one friendly phone call",
            "the {it} was spotless from front to back",
            "the scenery from the {it} was unforgettable",
            "the {it} offered free wifi that actually worked",
            "I would happily take the {it} again",
        ],
        [
            "the {it} was delayed for six hours with no explanation",
            "the {it} lost our luggage on the way out",
            "the seats on the {it} were cramped and filthy",
            "the {it} was overbooked and we were left behind",
            "the staff on the {it} shrugged at every question",
            "the toilets on the {it} were out of order",
            "the {it} was cancelled an hour before departure",
            "the {it} charged a fortune for a tiny bag",
            "the air on the {it} was stuffy and hot",
            "the refund for the {it} took four months",
            "the {it} rattled and lurched so much I felt sick",
            "I will never book the {it} again",
        ],
    ),
    "car": (
        ["car", "garage", "rental car", "mechanic", "dealership", "electric scooter", "car wash"],
        [
            "the {it} fixed the brakes the same afternoon",
            "the {it} was honest about what really needed repair",
            "the {it} handles beautifully on winding roads",
            "the quote from the {it} was fair and clear",
            "the {it} is cheap to run and never lets me down",
            "the {it} returned my car cleaner than I left it",
            "the {it} starts first time even in the frost",
            "the team at the {it} explained every step",
            "the {it} is quiet, smooth and easy to park",
            "the {it} had everything ready when I arrived",
            "the {it} saved me a lot of money on the repair",
            "the {it} feels solid and safe on the motorway",
        ],
        [
            "the {it} overcharged me for parts I never needed",
            "the {it} broke down twice in the first month",
            "the {it} kept my car for three weeks without a word",
            "the {it} smelled of smoke and old food",
            "the {it} scratched the door and denied it",
            "the {it} makes a grinding sound on every turn",
            "the {it} added hidden fees at the counter",
            "the {it} never returned any of my calls",
            "the {it} left a warning light on that was not there before",
            "the {it} drinks fuel like nothing else",
            "the {it} tried to sell me things I did not want",
            "the {it} handed the car back dirtier than before",
        ],
    ),
    "book": (
        ["novel", "memoir", "cookbook", "audiobook", "textbook", "short story collection", "comic"],
        [
            "the {it} was impossible to put down",
            "the characters in the {it} feel completely real",
            "the {it} made me cry and laugh on the same page",
            "the writing in the {it} is elegant and precise",
            "I finished the {it} in one weekend",
            "the {it} explains hard ideas in plain words",
            "the narrator of the {it} has a wonderful voice",
            "the {it} has already earned a place on my favourite shelf",
            "the recipes in the {it} all turned out great",
            "the {it} stayed with me for weeks afterwards",
            "the illustrations in the {it} are gorgeous",
            "the {it} is a generous, thoughtful piece of work",
        ],
        [
            "the {it} is padded with endless filler",
            "the characters in the {it} are flat and forgettable",
            "the {it} is riddled with typos",
            "I gave up on the {it} after three chapters",
            "the {it} repeats the same point over and over",
            "the narrator of the {it} mumbles through every line",
            "the ending of the {it} is rushed and lazy",
            "the recipes in the {it} simply do not work",
            "the {it} is far too long for what it has to say",
            "the {it} confuses more than it explains",
            "the binding of the {it} fell apart on the first read",
            "the {it} was a chore to get through",
        ],
    ),
    "course": (
        ["course", "workshop", "tutor", "online class", "language school", "coding bootcamp", "yoga class"],
        [
            "the {it} taught me more in a month than I learned in a year",
            "the teacher of the {it} was patient and inspiring",
            "the exercises in the {it} were practical and fun",
            "the {it} was well organised from the first day",
            "the {it} gave me the confidence to change jobs",
            "the feedback from the {it} was detailed and kind",
            "the {it} was worth every hour I put in",
            "the materials for the {it} are clear and up to date",
            "the {it} built a friendly community around it",
            "I signed up for the next {it} straight away",
            "the {it} fits perfectly around my work",
            "the {it} explained everything at just the right pace",
        ],
        [
            "the {it} was a disorganised mess",
            "the teacher of the {it} read slides aloud and nothing more",
            "the {it} was nothing like the syllabus promised",
            "the videos in the {it} are outdated and blurry",
            "the {it} cancelled half the sessions at short notice",
            "the {it} ignored every question we asked",
            "the {it} was far too expensive for what it offered",
            "the exercises in the {it} had errors everywhere",
            "I dropped out of the {it} after two weeks",
            "the {it} would not refund me when it was cancelled",
            "the platform for the {it} kept crashing during exams",
            "the {it} taught me nothing I could not find for free",
        ],
    ),
    "home": (
        ["plumber", "cleaning service", "landlord", "electrician", "moving company", "gardener", "internet provider"],
        [
            "the {it} turned up on time and worked tidily",
            "the {it} sorted the problem in under an hour",
            "the {it} charged exactly what was quoted",
            "the {it} left everything cleaner than before",
            "the {it} was polite and careful with our things",
            "the {it} gave useful advice for free",
            "the {it} came back the same day when something came up",
            "the {it} has been reliable for years",
            "the {it} handled a tricky job with real skill",
            "the {it} was easy to book and kept us informed",
            "our {it} is friendly and always responsive",
            "the {it} made a stressful week so much easier",
        ],
        [
            "the {it} never showed up for the appointment",
            "the {it} left a mess all over the kitchen",
            "the {it} broke a vase and refused to pay for it",
            "the {it} doubled the price once the work had started",
            "the {it} ignored the leak for a whole month",
            "the {it} was rude to my elderly neighbour",
            "the {it} did a sloppy job that had to be redone",
            "the {it} kept cutting out every evening",
            "the {it} arrived four hours late without calling",
            "the {it} damaged our floor and blamed the house",
            "our {it} ignores every message we send",
            "the {it} made a simple job drag on for weeks",
        ],
    ),
}

OPENERS = ["", "", "", "Honestly, ", "Overall, ", "To be fair, ", "I have to say ", "Update: ", "Wow, "]
ENDINGS_POS = [".", ".", ".", "!", ". Highly recommended.", ". Five stars.", ". Love it.", ". Very happy."]
ENDINGS_NEG = [".", ".", ".", "!", ". Avoid.", ". One star.", ". So disappointed.", ". Not again."]
JOIN_SAME = [", and ", "; ", ", plus ", ". On top of that, ", ". Also, "]
# A minor complaint softened by a clear overall verdict (and the reverse).
MIXED_POS = ["Although {neg}, {pos}", "{neg_cap}, but honestly {pos}", "Even though {neg}, {pos} overall"]
MIXED_NEG = ["Although {pos}, {neg}", "{pos_cap}, but sadly {neg}", "Sure, {pos}, yet {neg}"]

# Hand-written sentences: negation, sarcasm-free mixed cases, neutral-ish edge cases, short posts.
HAND_POSITIVE = [
    "Not bad at all, actually.", "I was not disappointed in the slightest.", "I can't complain about anything.",
    "It never fails to make me smile.", "Nothing about this bothered me.", "I wouldn't change a thing.",
    "You won't regret buying it.", "No complaints whatsoever, it just works.",
    "Not the cheapest option, but absolutely worth it.", "I didn't expect much, yet it blew me away.",
    "It isn't flashy, but it is wonderfully reliable.", "Hard to find anything wrong with it.",
    "I have never had such a smooth checkout.", "There is not a single thing I dislike about it.",
    "Can't recommend them enough.", "I doubted it at first, but it turned out great.",
    "The wait was long, but the meal made up for it.", "A bit pricey, still the best I have had.",
    "Slow start, but the second half is brilliant.", "The box was dented, yet everything inside was perfect.",
    "Just got my order and I'm thrilled.", "Best decision I made all month.", "Totally made my day.",
    "Ten out of ten, would buy again.", "So glad I found this place.", "This little gadget is a lifesaver.",
    "My kids adore it.", "Finally, something that works as advertised.", "Thank you for the quick fix, you're amazing.",
    "Issue resolved, great job everyone.", "Really pleased with how this turned out.",
    "It does the job and then some.", "Quietly one of the best albums of the year.",
    "Fair price, kind staff, tasty food.", "Brilliant service from start to finish.",
    "I keep coming back because it is that good.", "Way better than I imagined.",
    "The update made everything snappier, nice work.", "Smooth delivery and a lovely product.",
    "What a pleasant surprise.", "Feels good to finally get a straight answer, thanks.",
    "I'm impressed by how well this holds up.", "Genuinely the nicest hotel staff I have met.",
    "This recipe site saved my dinner party.", "It is simple, but it is exactly what I needed.",
    "Not once did it let me down.", "I never thought a kettle could make me this happy.",
    "My complaint was handled better than I could have hoped.", "Cheerful, clean and great value.",
    "Warmly recommended to anyone visiting the city.", "The refund arrived the next morning, thank you.",
    "Nothing fancy, just honest good food.", "I wasn't sure about the colour, but it looks lovely.",
    "It is neither loud nor heavy, which is exactly what I wanted.", "Solid, dependable and well priced.",
    "Our anniversary dinner was perfect.", "Good things come to those who wait, and this was worth it.",
    "This show gets better with every episode.", "I'd happily pay double for it.",
]
HAND_NEGATIVE = [
    "I wouldn't recommend it to anyone.", "Not worth the money.", "It doesn't work, plain and simple.",
    "Never again.", "I can't believe how bad this was.", "Nothing about it was enjoyable.",
    "It is not good, no matter what the ads say.", "I didn't like it one bit.",
    "Don't waste your time on this.", "It hardly works at all.", "No one should have to deal with this.",
    "The design is pretty, but it barely functions.", "Cheap, yes, but it fell apart in a week.",
    "The staff were polite, yet the food was inedible.", "Great trailer, terrible movie.",
    "It looks nice in the photos, in reality it is a mess.", "Fast shipping, broken product.",
    "I really wanted to like it, but I couldn't.", "Started well, then it went downhill fast.",
    "My order still hasn't arrived after three weeks.", "Still waiting for a reply to my ticket.",
    "Third time this month the service went down.", "Worst customer experience I've ever had.",
    "Seriously disappointed.", "What a letdown.", "Ugh, it broke again.", "Total rip-off.",
    "I want my money back.", "Absolutely hopeless support.", "Please fix this bug, it makes the app unusable.",
    "My account was locked for no reason and nobody helps.", "The package arrived soaked and torn.",
    "Two hours of my life I will never get back.", "The room was nothing like what we booked.",
    "They promised a callback that never came.", "The coffee was burnt and the croissant was stale.",
    "I regret buying this.", "It sounded like a good idea, but it is a disaster.",
    "The new version is a big step backwards.", "It is loud, clumsy and overpriced.",
    "I gave it a fair chance and it failed me.", "Not once did it work the way it should.",
    "The battery barely lasts a morning.", "Instructions missing, parts missing, patience gone.",
    "I have never been so frustrated with a company.", "The charge on my card is still not refunded.",
    "It was not what I ordered and returning it is a nightmare.", "Mediocre at best, and that is generous.",
    "The noise is unbearable.", "This is the last time I book with them.", "Sadly it just doesn't deliver.",
    "It isn't terrible, but it is definitely not worth the price.", "Looks sturdy, feels flimsy.",
    "The plot twist was obvious and the ending fell flat.", "I couldn't finish the book, it was that dull.",
    "Every update makes it slower.", "Our table was ready, the food never was.",
    "Friendly faces cannot make up for a filthy room.", "Nobody seems to care about quality anymore.",
]

# Written for the 500-sentence held-out set (issue 13): other phrasings, other topics.
HAND_POSITIVE_MORE = [
    "Exceeded every expectation I had.", "It arrived quickly and works like a charm.",
    "I'm genuinely happy with this purchase.", "Everyone at the table loved their meal.",
    "The staff remembered our names, which was a lovely touch.", "It's the little details that make it great.",
    "I've used it daily for a year and it's still flawless.", "Easily worth twice the price.",
    "A real gem hidden on a quiet street.", "I would not hesitate to book again.",
    "She fixed in ten minutes what others could not fix in a week.", "Such a relief to deal with people who care.",
    "Crisp sound, long battery, no regrets.", "Beautifully made and a joy to use.",
    "Our kids didn't want to leave.", "The support chat answered in seconds and solved it.",
    "This is how customer service should be done.", "It's quiet, fast and looks fantastic.",
    "Every episode left me wanting more.", "I laughed so hard I cried.",
    "The new features are exactly what I'd been hoping for.", "Couldn't be happier with the result.",
    "We felt looked after from the moment we arrived.", "It made my commute something to look forward to.",
    "Lovely people, lovely food, lovely evening.", "The instructions were clear and setup was a breeze.",
    "Never had a single problem with it.", "I didn't think I'd enjoy it this much.",
    "Not a single complaint from anyone in the family.", "It's not perfect, but it's very, very good.",
    "My expectations were low, and it still surprised me.", "The price is fair and the quality is outstanding.",
    "The whole process took five minutes and was painless.", "The teacher made a dull subject exciting.",
    "Worth the trip across town.", "They went the extra mile, and it showed.",
    "I keep recommending it to friends.", "Pure comfort from start to finish.",
    "Delicious, generous and reasonably priced.", "The view alone was worth it, and the rest was great too.",
    "Reliable as ever, I'm a customer for life.", "My back pain is gone since I switched chairs.",
    "The repair was quick and the price was honest.", "Can't fault it in any way.",
    "Thanks to their help, the move went smoothly.", "It was love at first bite.",
    "The app finally does what it says, and does it well.", "A warm, funny and clever film.",
    "It feels like it was designed by people who actually use it.", "Sturdy enough for daily use and still looks new.",
    "The best haircut I've had in years.", "An absolute pleasure to deal with.",
    "I'd give it six stars if I could.", "It's everything the reviews promised.",
    "The hotel upgraded our room without us even asking.", "The pharmacist took time to explain everything.",
    "Fresh ingredients, big flavours, friendly faces.", "It kept working even after I dropped it in the rain.",
    "Nothing went wrong, which is rare these days.", "A thoughtful gift that got a huge smile.",
    "This game is addictive in the best way.", "It's cheap and it's cheerful and it works.",
    "The night was magical from start to end.", "Five minutes in and I was hooked.",
    "The delivery driver was kind and careful.", "It paid for itself within a month.",
    "Smart, simple and surprisingly powerful.", "I felt heard, and the problem was fixed.",
    "Our guide was funny, patient and full of stories.", "Better than the version I had before in every way.",
]
HAND_NEGATIVE_MORE = [
    "Fell apart after two uses.", "I'm returning it tomorrow.", "Nobody warned us about the construction noise.",
    "The food took forever and arrived cold.", "It's a shame, because the idea is good.",
    "It worked once and never again.", "Every call ends with 'we'll get back to you', and they never do.",
    "The colours faded after one wash.", "It sounded great on paper and awful in practice.",
    "We left hungry and annoyed.", "I expected so much more for that price.",
    "The screen cracked on its own within a week.", "Half the features are locked behind another payment.",
    "The hotel was nothing like the glossy photos.", "I'm still waiting for my refund.",
    "The customer service agent hung up on me.", "Overpriced, underwhelming and slow.",
    "The strap snapped on the first day.", "They lost my booking and shrugged.",
    "This update broke everything that used to work.", "I felt ignored the whole evening.",
    "The course material was copied from a free website.", "Too loud to think, too dirty to relax.",
    "It stopped charging after a month.", "Not even the dog would eat it.",
    "The manual is in a language nobody here speaks.", "I wouldn't wish this on my worst enemy.",
    "It looked used when it arrived.", "Every step of the process was a struggle.",
    "The noise from the fan drives me mad.", "A complete waste of an afternoon.",
    "Two stars for the nice packaging, nothing else.", "The film is two hours of shouting and explosions.",
    "The sequel ruins everything the first one built.", "I've never felt so ripped off.",
    "It smelled strongly of chemicals for days.", "The shop refused to honour the warranty.",
    "Cheap materials, clumsy design, disappointing result.", "I asked for help three times and got none.",
    "The waiter rolled his eyes when we ordered.", "It leaks every time I use it.",
    "The trip was ruined by endless delays.", "I can't recommend this to anyone, sadly.",
    "The app eats my data and gives nothing back.", "Broken on arrival, and no one answers emails.",
    "The story goes nowhere and takes forever to get there.", "Our room had no hot water for three days.",
    "It's pretty, but utterly useless.", "I feel cheated.", "The portions shrank and the prices doubled.",
    "The mechanic made the problem worse.", "Customer support is a maze of bots.",
    "It was over before it got interesting.", "Honestly the worst meal I've had this year.",
    "The charger melted, which is frankly scary.", "I wanted to love it, but it let me down.",
    "They cancelled my order without telling me.", "It's clunky, slow and keeps freezing.",
    "We were charged for things we never ordered.", "The seats were so uncomfortable I couldn't sleep.",
    "The tutorial skipped every important step.", "It rained inside our tent, great design.",
    "The price went up and the quality went down.", "Everything about the check-in was chaotic.",
    "I ended up buying a replacement from another brand.", "The instructor didn't turn up, twice.",
    "My parcel was left in the rain and ruined.", "A bland, forgettable meal at a ridiculous price.",
    "It does one job and does it badly.", "Avoid unless you enjoy wasting money.",
]

def _clean(text: str) -> str:
    text = " ".join(text.split())
    return text[0].upper() + text[1:]


def _finish(text: str, ending: str) -> str:
    return _clean(text + ending)


def _compose(domain: str, pool_pos: list[str], pool_neg: list[str], things: list[str], rng: random.Random,
             n_per_class: int) -> list[tuple[str, str]]:
    """Review sentences from one domain's clause pools, half single-clause, then pairs and mixed cases."""
    out: list[tuple[str, str]] = []
    for label, same, other, endings, mixed in (
        ("positive", pool_pos, pool_neg, ENDINGS_POS, MIXED_POS),
        ("negative", pool_neg, pool_pos, ENDINGS_NEG, MIXED_NEG),
    ):
        made: set[str] = set()
        attempts = 0
        while len(made) < n_per_class and attempts < 50 * n_per_class:
            attempts += 1
            it = rng.choice(things)
            kind = rng.random()
            a = rng.choice(same).format(it=it)
            if kind < 0.45:
                text = _finish(rng.choice(OPENERS) + a, rng.choice(endings))
            elif kind < 0.8:
                b = rng.choice([c for c in same if c.format(it=it) != a]).format(it=it)
                if domain != "support" and b.startswith(f"the {it} ") and rng.random() < 0.6:
                    b = "it" + b[len(f"the {it}"):]  # "..., and it works perfectly"
                text = _finish(a + rng.choice(JOIN_SAME) + b, rng.choice(endings))
            else:
                minor = rng.choice(other).format(it=it)
                template = rng.choice(mixed)
                pos, neg = (a, minor) if label == "positive" else (minor, a)
                text = _finish(template.format(pos=pos, neg=neg, pos_cap=_clean(pos), neg_cap=_clean(neg)), ".")
            if text not in made:
                made.add(text)
                out.append((text, label))
    return out


def _split(items: list[str], rng: random.Random) -> tuple[list[str], list[str]]:
    shuffled = items[:]
    rng.shuffle(shuffled)
    k = max(1, round(len(shuffled) * TEST_SHARE))
    return shuffled[k:], shuffled[:k]


def generate(seed: int = SEED) -> list[dict[str, str]]:
    """Rows {text, label, split, source}, balanced per split."""
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    for domain, (things, pos, neg) in DOMAINS.items():
        pos_train, pos_test = _split(pos, rng)
        neg_train, neg_test = _split(neg, rng)
        for split, p, n in (("train", pos_train, neg_train), ("test", pos_test, neg_test)):
            for text, label in _compose(domain, p, n, things, rng, PER_CLASS[split]):
                rows.append({"text": text, "label": label, "split": split, "source": domain})
    for label, sentences in (("positive", HAND_POSITIVE + HAND_POSITIVE_MORE),
                             ("negative", HAND_NEGATIVE + HAND_NEGATIVE_MORE)):
        train, test = _split(sentences, rng)
        rows += [{"text": t, "label": label, "split": "train", "source": "handwritten"} for t in train]
        rows += [{"text": t, "label": label, "split": "test", "source": "handwritten"} for t in test]
    seen: set[str] = set()
    unique = [r for r in rows if not (r["text"] in seen or seen.add(r["text"]))]
    rng.shuffle(unique)
    return unique


def main() -> None:
    rows = generate()
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    by = {(r["split"], r["label"]) for r in rows}
    counts = {k: sum(1 for r in rows if (r["split"], r["label"]) == k) for k in sorted(by)}
    print(f"wrote {len(rows)} rows to {OUT}: {counts}")


if __name__ == "__main__":
    main()
