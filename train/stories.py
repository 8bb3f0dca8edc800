"""Deterministic generator of simple children's stories in the style of TinyStories.

The training pipeline needs data that works offline, ships inside the package and is
identical on every machine, so that a run with the default data can be reproduced
anywhere and its validation loss compared. The stories here are built from templates:
a hero (a child or an animal), a friend, a place, a favourite object, one problem from
a set of plot kinds with its resolution, an ending and sometimes a moral. The plot kinds
keep each story coherent (the lost ball is found, the broken cup is confessed), and the
word lists give enough combinations and vocabulary (several hundred distinct words) that
a small language model has structure to learn and a held-out split to be measured on.

Only ``random.Random`` is used, and only its methods whose output Python guarantees to
be stable for a given seed (``choice``, ``random``, ``shuffle``); all word lists are
lists, never sets, whose iteration order would depend on string hashing.

Example:
    >>> from growkit.train.stories import generate_stories
    >>> stories = generate_stories(3, seed=0)
    >>> len(stories)
    3
"""
from __future__ import annotations

import random
from typing import Callable

__all__ = ["generate_stories", "compose_story", "MIN_SENTENCES", "MAX_SENTENCES"]

MIN_SENTENCES = 4
MAX_SENTENCES = 8

# ---------------------------------------------------------------------------
# Word lists. Order matters for determinism: never turn these into sets.
# ---------------------------------------------------------------------------

_GIRL_NAMES = [
    "Lily", "Mia", "Sue", "Amy", "Lucy", "Emma", "Anna", "Sara", "Zoe", "Ella",
    "Rosa", "Kim", "Nina", "Ruby", "Daisy", "Molly", "Sophie", "Grace", "Chloe",
    "Maya", "Jenny", "Hannah", "Ivy", "Lena", "Olive", "Poppy", "Rose", "Bella",
]
_BOY_NAMES = [
    "Tom", "Ben", "Max", "Sam", "Tim", "Jack", "Leo", "Finn", "Joe", "Jake",
    "Noah", "Luke", "Adam", "Oscar", "Eli", "Theo", "Henry", "Owen", "Ryan",
    "Dan", "Bob", "Milo", "Charlie", "Toby", "Oliver", "Jim", "Peter", "Hugo",
]

# animal -> (how it speaks, how it moves). Children use "said"/"ran".
_ANIMALS = [
    ("bunny", "squeaked", "hopped"),
    ("cat", "meowed", "ran"),
    ("dog", "barked", "ran"),
    ("puppy", "barked", "ran"),
    ("kitten", "meowed", "ran"),
    ("bird", "chirped", "flew"),
    ("duck", "quacked", "waddled"),
    ("frog", "croaked", "hopped"),
    ("bear", "growled", "walked"),
    ("fox", "said", "ran"),
    ("mouse", "squeaked", "ran"),
    ("owl", "hooted", "flew"),
    ("pig", "oinked", "trotted"),
    ("lamb", "said", "skipped"),
    ("horse", "neighed", "galloped"),
    ("turtle", "said", "crawled"),
    ("squirrel", "chattered", "ran"),
    ("lion", "roared", "walked"),
    ("monkey", "said", "swung"),
    ("elephant", "trumpeted", "walked"),
    ("giraffe", "said", "walked"),
    ("tiger", "said", "ran"),
    ("goat", "said", "trotted"),
    ("deer", "said", "ran"),
    ("hedgehog", "said", "waddled"),
    ("penguin", "said", "waddled"),
]
# Animals that can plausibly fetch something from up high.
_TALL_OR_FLYING = ["bird", "owl", "giraffe", "monkey", "squirrel", "elephant"]

_TRAITS = [
    "little", "kind", "curious", "brave", "shy", "happy", "playful", "clever",
    "silly", "friendly", "gentle", "cheerful", "busy", "sleepy", "helpful",
    "tiny", "small", "funny", "polite", "quiet", "young", "smart",
]

_ACTIVITIES = [
    "run fast", "jump in puddles", "sing songs", "dance in the sun", "paint pictures",
    "read books", "climb trees", "play with blocks", "look at the stars",
    "pick flowers", "build sand castles", "play hide and seek", "swing on the swing",
    "draw with crayons", "splash in the water", "chase butterflies",
    "help {his} {parent}", "bake cookies", "ride {his} bike", "collect shiny rocks",
    "watch the clouds", "play games", "explore new places", "listen to stories",
    "make funny faces", "count the birds", "roll down the hill", "hum a happy tune",
]

_OBJECTS = [
    "ball", "kite", "toy car", "teddy bear", "hat", "doll", "book", "boat",
    "balloon", "shell", "cup", "scarf", "ring", "drum", "toy train", "blanket",
    "bucket", "shovel", "robot", "puzzle", "necklace", "map", "key", "whistle",
    "umbrella", "bell", "crown", "wand", "box", "rock", "button", "spoon",
]
_OBJECT_ADJECTIVES = [
    "red", "blue", "green", "yellow", "pink", "purple", "orange", "white",
    "shiny", "soft", "big", "little", "new", "old", "striped", "sparkly",
    "golden", "silver", "round", "tiny", "fluffy", "bright", "special", "favorite",
]

_PARENTS = ["mom", "dad", "grandma", "grandpa", "mommy", "daddy"]

_PLACES = [
    dict(name="the park", prep="at",
         details=["There were tall trees and a big red slide.",
                  "Many kids were laughing on the swings."],
         spots=["under a wooden bench", "behind a big bush", "next to the slide",
                "in the sandbox"]),
    dict(name="the beach", prep="at",
         details=["The sand was warm and the sea was blue.",
                  "Big waves crashed on the shore."],
         spots=["under a pile of sand", "behind a big rock", "next to a sand castle",
                "near the water"]),
    dict(name="the forest", prep="in",
         details=["The trees were tall and green, and birds sang in the branches.",
                  "The forest was quiet and smelled of pine."],
         spots=["under an old log", "behind a big tree", "in a pile of leaves",
                "next to a little stream"]),
    dict(name="the garden", prep="in",
         details=["The flowers were pink, yellow and red.",
                  "Bees were buzzing around the flowers."],
         spots=["under a big leaf", "behind the flower pots", "in the tall grass",
                "next to the carrots"]),
    dict(name="the farm", prep="on",
         details=["The cows said moo and the pigs rolled in the mud.",
                  "There was a big red barn and a field of corn."],
         spots=["in the hay", "behind the red barn", "next to the pig pen",
                "under the old wagon"]),
    dict(name="the playground", prep="at",
         details=["There was a slide, a swing and a tall climbing frame.",
                  "The playground was full of happy noise."],
         spots=["under the slide", "behind the swings", "in the sandbox",
                "next to the gate"]),
    dict(name="the lake", prep="at",
         details=["The water was calm and the ducks swam in a line.",
                  "Little fish jumped out of the water."],
         spots=["in the reeds", "under the little bridge", "on a lily pad",
                "next to a boat"]),
    dict(name="the meadow", prep="in",
         details=["The grass was soft and full of daisies.",
                  "Butterflies danced over the grass."],
         spots=["in the tall grass", "under a yellow flower", "behind a hill",
                "near a big stone"]),
    dict(name="the zoo", prep="at",
         details=["They saw lions, zebras and a very tall giraffe.",
                  "The monkeys were jumping and making funny sounds."],
         spots=["near the monkey house", "under a bench", "behind a sign",
                "next to the pond"]),
    dict(name="the library", prep="at",
         details=["There were so many books on the shelves.",
                  "It was very quiet and everyone was reading."],
         spots=["under a table", "behind a shelf", "between two books",
                "next to a big chair"]),
    dict(name="the market", prep="at",
         details=["There were apples, bread and sweet cakes everywhere.",
                  "People were busy buying fruit and bread."],
         spots=["under a fruit stand", "behind a big basket", "next to the bread",
                "near the flower stall"]),
    dict(name="the snowy hill", prep="on",
         details=["Everything was white and cold.",
                  "Kids were sliding down on their sleds."],
         spots=["under the snow", "behind a snowman", "next to a sled",
                "near a frozen pond"]),
    dict(name="the school", prep="at",
         details=["The teacher smiled and the room was full of colors.",
                  "There were pictures and letters on the walls."],
         spots=["under a desk", "in the toy box", "behind the door",
                "next to the blackboard"]),
    dict(name="the river", prep="by",
         details=["The water was fast and made a happy sound.",
                  "Smooth stones lay along the shore."],
         spots=["between two stones", "under a bush", "next to a log",
                "in the mud"]),
]

_HOME_PLACES = [
    dict(name="the kitchen", prep="in",
         spots=["under the table", "behind the chair", "in the cupboard"]),
    dict(name="the living room", prep="in",
         spots=["under the couch", "behind the curtain", "under a pillow"]),
    dict(name="the bedroom", prep="in",
         spots=["under the bed", "in the closet", "behind the toy box"]),
]

_HIGH_SPOTS = [
    "up in a tall tree", "on top of the fence", "on a high branch",
    "on the roof of the shed", "on top of a big rock",
]

_WEATHER = [
    "It was a sunny day and the sky was blue.",
    "The sun was shining and the birds were singing.",
    "It was a warm day with a soft wind.",
    "The sky was gray, and the air was cool.",
    "It was a bright morning and everything was green.",
    "It was a windy day and the leaves were dancing.",
]

_HAPPY = ["happy", "glad", "excited", "thankful", "cheerful", "joyful"]
# Used in any plot, so only words that fit every trouble (no "scared", "lonely").
_SAD = ["sad", "upset", "unhappy", "very sad", "gloomy"]

# Morals are clauses so they can follow "learned that" or "the moral is that".
_MORAL_FRAMES = [
    "{name} learned that {moral}.",
    "The moral of the story is that {moral}.",
    "From then on, {name} always remembered that {moral}.",
    "That day, {name} learned an important lesson: {moral}.",
]

_GENERIC_ENDINGS = [
    "{name} smiled. It was the best day ever.",
    "That night, {name} went to bed with a big smile on {his} face.",
    "{name} felt {happy} all day long.",
    "Then {name} went home, feeling {happy} and warm inside.",
    "It was a day {name} would always remember.",
]
_FRIEND_ENDINGS = [
    "From that day on, {name} and {fname} were the best of friends.",
    "{name} and {fname} laughed and played until the sun went down.",
    "After that, {name} and {fname} played together every day.",
]


def _a(word: str) -> str:
    """Returns ``word`` with the right indefinite article in front."""
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def _cap(sentence: str) -> str:
    """Upper-cases the first letter, skipping a leading quote mark."""
    for i, ch in enumerate(sentence):
        if ch.isalpha():
            return sentence[:i] + ch.upper() + sentence[i + 1:]
    return sentence


def _pronouns(female: bool, prefix: str = "") -> dict[str, str]:
    he, his, him = ("she", "her", "her") if female else ("he", "his", "him")
    return {
        prefix + "he": he, prefix + "He": he.capitalize(),
        prefix + "his": his, prefix + "His": his.capitalize(),
        prefix + "him": him,
    }


def _character(rng: random.Random, avoid: str | None = None) -> dict:
    """Draws a hero or friend: a child or an animal, with a name and pronouns."""
    female = rng.random() < 0.5
    names = _GIRL_NAMES if female else _BOY_NAMES
    name = rng.choice(names)
    while name == avoid:
        name = rng.choice(names)
    if rng.random() < 0.5:
        kind = "girl" if female else "boy"
        say, move, animal = "said", "ran", ""
    else:
        animal, say, move = rng.choice(_ANIMALS)
        kind = animal
    return dict(name=name, kind=kind, animal=animal, say=say, move=move,
                female=female)


def _object_phrase(rng: random.Random) -> tuple[str, str]:
    """Returns (adjectives + noun, bare noun) for the hero's favourite object."""
    noun = rng.choice(_OBJECTS)
    if rng.random() < 0.3:
        size = rng.choice(["shiny", "big", "little", "new", "old", "soft"])
        colour = rng.choice(["red", "blue", "green", "yellow", "pink", "purple"])
        return f"{size} {colour} {noun}", noun
    return f"{rng.choice(_OBJECT_ADJECTIVES)} {noun}", noun


# ---------------------------------------------------------------------------
# Plot kinds. Each returns (setup, problem, resolution, endings, morals):
# one setup sentence, 1-2 problem sentences, 1-2 resolution sentences, a list of
# ending candidates and a list of moral clauses. Keeping problem + resolution at
# <= 4 sentences is what lets the composer stay within MAX_SENTENCES.
# ---------------------------------------------------------------------------

_Plot = tuple[str, list[str], list[str], list[str], list[str]]


def _plot_lost(rng: random.Random, c: dict) -> _Plot:
    setup = rng.choice([
        "One day, {name} took {his} {obj} to {place} to play with {fname}.",
        "One sunny morning, {name} and {fname} went to {place} with {name}'s {obj}.",
        "One day, {name} was playing with {his} {obj} {at_place}.",
    ])
    problem = [rng.choice([
        "When {he} looked down, {his} {obj} was gone.",
        "Suddenly, {name} could not find {his} {obj}.",
        "After a while, {name} saw that {his} {obj} was not there anymore.",
    ])]
    if rng.random() < 0.6:
        problem.append(rng.choice([
            "{name} felt {sad} and started to cry.",
            "\"Where is my {obj}?\" {name} {say}.",
            "{He} looked up and down, but {he} could not see it.",
        ]))
    resolution = [rng.choice([
        "{fname} said, \"Don't be sad. I will help you look.\"",
        "{fname} saw that {name} was {sad} and wanted to help.",
        "{name}'s {parent} came and said, \"Let's look together.\"",
    ])]
    resolution.append(rng.choice([
        "They looked everywhere, and at last they found the {objn} {spot}.",
        "Soon they found the {objn} {spot}, safe and sound.",
        "Then {name} saw something {spot}. It was {his} {obj}!",
    ]) if rng.random() < 0.5 else
        "They looked {spot} and found the {objn} there.")
    endings = [
        "\"Thank you!\" {name} {say}, and {he} gave {fname} a big hug.",
        "{name} held {his} {obj} tight and smiled.",
    ]
    morals = [
        "friends help each other when things go wrong",
        "it is good to help others",
        "you should not give up when you lose something",
    ]
    return setup, problem, resolution, endings, morals


def _plot_stuck(rng: random.Random, c: dict) -> _Plot:
    c["high"] = rng.choice(_HIGH_SPOTS)
    setup = rng.choice([
        "One windy day, {name} went to {place} with {his} {obj}.",
        "One day, {name} and {fname} were playing with {name}'s {obj} {at_place}.",
        "One afternoon, {name} took {his} {obj} to {place}.",
    ])
    problem = [rng.choice([
        "A strong wind came and blew the {objn} {high}.",
        "{name} threw the {objn} too high, and it got stuck {high}.",
        "Oh no! The {obj} flew away and landed {high}.",
    ])]
    if rng.random() < 0.6:
        problem.append(rng.choice([
            "{He} jumped and jumped, but {he} could not reach it.",
            "{He} tried to climb up, but it was too high.",
            "{name} felt {sad} because {he} could not get it down.",
        ]))
    if c["fanimal"] in _TALL_OR_FLYING:
        resolution = ["{fname} the {fkind} said, \"I can help!\" and got the {objn} down."]
    else:
        resolution = [rng.choice([
            "{fname} had an idea and found a long stick.",
            "{name} asked {his} {parent} for help.",
            "{fname} went to get a ladder.",
        ])]
        resolution.append(rng.choice([
            "With a little push, the {objn} fell down into {name}'s arms.",
            "Soon the {objn} was back on the ground.",
            "Together they got the {objn} down.",
        ]))
    endings = [
        "{name} was so {happy} that {he} danced around.",
        "\"Thank you so much!\" {name} {say} with a big smile.",
    ]
    morals = [
        "it is okay to ask for help",
        "two heads are better than one",
        "working together makes hard things easy",
    ]
    return setup, problem, resolution, endings, morals


def _plot_broken(rng: random.Random, c: dict) -> _Plot:
    home = rng.choice(_HOME_PLACES)
    c["at_home"] = True
    c["place"], c["at_place"] = home["name"], f"{home['prep']} {home['name']}"
    c["thing"] = rng.choice(["vase", "cup", "plate", "lamp", "bowl", "clock", "jar"])
    c["thing_adj"] = rng.choice(["favorite", "pretty", "old", "blue", "special"])
    setup = rng.choice([
        "One day, {name} was playing with {his} {obj} {at_place}.",
        "One rainy day, {name} and {fname} were playing {at_place}.",
        "One morning, {name} was running around {at_place}.",
    ])
    problem = [rng.choice([
        "Crash! {He} bumped into the table and {his} {parent}'s {thing_adj} {thing} broke.",
        "{He} was not careful, and {his} {parent}'s {thing_adj} {thing} fell and broke.",
    ])]
    if rng.random() < 0.6:
        problem.append(rng.choice([
            "{name} felt scared and wanted to hide.",
            "{He} thought about saying that the cat did it.",
            "{name} was worried that {his} {parent} would be angry.",
        ]))
    resolution = [rng.choice([
        "But {name} went to {his} {parent} and told the truth.",
        "{name} took a deep breath and said, \"I'm sorry, I broke it.\"",
    ])]
    resolution.append(rng.choice([
        "{His} {parent} hugged {him} and said, \"Thank you for telling me the truth.\"",
        "{His} {parent} smiled and said, \"It's okay. We can fix it together.\"",
        "{His} {parent} was not angry, because {name} was honest.",
    ]))
    endings = [
        "{name} felt much better after telling the truth.",
        "Then they glued the {thing} back together, and {name} felt {happy}.",
    ]
    morals = [
        "it is always best to tell the truth",
        "being honest is better than hiding a mistake",
    ]
    return setup, problem, resolution, endings, morals


def _plot_share(rng: random.Random, c: dict) -> _Plot:
    setup = rng.choice([
        "One day, {name} was playing with {his} {obj} {at_place}.",
        "One day, {name} brought {his} {obj} to {place}.",
    ])
    problem = [rng.choice([
        "{fname} came and asked, \"Can I play with your {objn}?\"",
        "{fname} saw the {objn} and wanted to play with it too.",
    ])]
    problem.append(rng.choice([
        "\"No, it is mine!\" {name} {say}, and {fname} looked {sad}.",
        "But {name} did not want to share, and {fname} walked away {sad}.",
    ]))
    resolution = [rng.choice([
        "{name} felt bad, so {he} ran after {fname} and gave {fhim} the {objn}.",
        "Then {name} thought about how {fname} felt, and {he} said, \"Let's play together.\"",
    ])]
    if rng.random() < 0.5:
        resolution.append(rng.choice([
            "Playing together was much more fun than playing alone.",
            "{fname} smiled, and they took turns with the {objn}.",
        ]))
    endings = list(_FRIEND_ENDINGS)
    morals = [
        "sharing makes everyone happy",
        "it is more fun to play together",
        "sharing is caring",
    ]
    return setup, problem, resolution, endings, morals


def _plot_rain(rng: random.Random, c: dict) -> _Plot:
    c["food"] = rng.choice(["sandwiches", "apples", "cookies", "cake", "grapes",
                            "bread and cheese", "pie", "juice and muffins"])
    setup = rng.choice([
        "One day, {name} and {fname} went to {place} for a picnic with {food}.",
        "One morning, {name} and {his} {parent} took {food} to {place} for a picnic.",
    ])
    problem = [rng.choice([
        "Suddenly, dark clouds came and it started to rain.",
        "But then the sky turned gray, and big drops of rain began to fall.",
    ])]
    if rng.random() < 0.5:
        problem.append("{name} was {sad} because the picnic was ruined.")
    resolution = [rng.choice([
        "They ran {shelter} and waited for the rain to stop.",
        "Then {name} laughed and said, \"Let's jump in the puddles!\"",
        "They sat {shelter} and ate their {food} while the rain fell.",
    ])]
    if rng.random() < 0.6:
        resolution.append(rng.choice([
            "When the rain stopped, a big rainbow came out.",
            "Soon the sun came back, and everything was shiny and wet.",
        ]))
    c["shelter"] = rng.choice(["under a big tree", "into a little hut",
                               "under the bridge", "under an umbrella"])
    endings = [
        "It was the best picnic ever.",
        "{name} learned to have fun, even on a rainy day.",
    ]
    morals = [
        "you can find fun even when plans change",
        "a rainy day can still be a good day",
    ]
    return setup, problem, resolution, endings, morals


def _plot_fear(rng: random.Random, c: dict) -> _Plot:
    fear, truth = rng.choice([
        ("a loud noise in the bushes", "it was only a little bird"),
        ("a big shadow on the wall", "it was only the shadow of a tree"),
        ("a strange sound in the dark", "it was only the wind"),
        ("a big dog", "the dog only wanted to play"),
        ("the dark cave", "inside there were only sleepy bats"),
        ("the deep water", "the water was fun and warm"),
        ("the thunder", "the thunder could not hurt anyone"),
    ])
    c["fear"], c["truth"] = fear, truth
    setup = rng.choice([
        "One evening, {name} and {fname} were {at_place}.",
        "One day, {name} went to {place} with {his} {parent}.",
    ])
    problem = [rng.choice([
        "Suddenly, {name} heard {fear} and felt very scared.",
        "{name} was afraid of {fear}.",
    ])]
    if rng.random() < 0.5:
        problem.append("{He} wanted to run home and hide.")
    resolution = [rng.choice([
        "{fname} held {his} hand and said, \"Let's be brave together.\"",
        "{His} {parent} said, \"Let's go and look. There is nothing to fear.\"",
        "{name} took a deep breath and decided to be brave.",
    ])]
    resolution.append("Then {name} saw that " + truth + ".")
    endings = [
        "{name} laughed and was not scared anymore.",
        "{name} felt {happy} and brave.",
    ]
    morals = [
        "being brave can help you see that things are not so scary",
        "you do not have to be afraid when friends are with you",
    ]
    return setup, problem, resolution, endings, morals


def _plot_hurt(rng: random.Random, c: dict) -> _Plot:
    setup = rng.choice([
        "One day, {name} and {fname} were running {at_place}.",
        "One day, {name} went to {place} to play with {fname}.",
    ])
    problem = [rng.choice([
        "{fname} fell down and hurt {fhis} knee.",
        "{fname} tripped over a rock and began to cry.",
        "{fname} sat alone and looked very sad.",
    ])]
    resolution = [rng.choice([
        "{name} ran to {fname} and helped {fhim} up.",
        "{name} sat next to {fname} and gave {fhim} a hug.",
        "{name} shared {his} {obj} to make {fname} feel better.",
    ])]
    if rng.random() < 0.6:
        resolution.append(rng.choice([
            "\"Thank you for being my friend,\" {fname} {fsay}.",
            "Soon {fname} was smiling again.",
            "{fname} felt much better.",
        ]))
    endings = list(_FRIEND_ENDINGS) + ["{name} felt warm inside because {he} had helped."]
    morals = [
        "kindness is the best gift",
        "we should always help a friend in need",
        "a little kindness can make a big difference",
    ]
    return setup, problem, resolution, endings, morals


def _plot_bird(rng: random.Random, c: dict) -> _Plot:
    c["critter"] = rng.choice(["bird", "kitten", "puppy", "duckling", "bunny", "butterfly"])
    setup = rng.choice([
        "One day, {name} went for a walk to {place}.",
        "One morning, {name} went to {place} with {fname}.",
    ])
    problem = [rng.choice([
        "{He} found a little {critter} that was hurt and could not move.",
        "{He} saw a tiny {critter} {spot}, all alone and cold.",
    ])]
    resolution = [rng.choice([
        "{name} took the {critter} home and gave it food and water.",
        "{name} wrapped the {critter} in a soft blanket and kept it warm.",
    ])]
    resolution.append(rng.choice([
        "After a few days, the {critter} was strong again and went back to its family.",
        "Soon the {critter} was well, and it came to visit {name} every day.",
    ]))
    endings = [
        "{name} felt {happy} that {he} had helped.",
        "{name} waved goodbye and smiled.",
    ]
    morals = [
        "we should be kind to animals",
        "even small helpers can do big things",
    ]
    return setup, problem, resolution, endings, morals


def _plot_lost_way(rng: random.Random, c: dict) -> _Plot:
    c["at_home"] = True  # the story ends there
    c["landmark"] = rng.choice(["the big red barn", "the tall tree", "the little bridge",
                                "the smoke from the chimney", "the sound of the bells"])
    setup = rng.choice([
        "One day, {name} went to {place} to {activity}.",
        "One day, {name} followed a butterfly into {place}.",
    ])
    problem = [rng.choice([
        "{He} went too far and could not find the way home.",
        "Soon {name} did not know where {he} was.",
    ])]
    if rng.random() < 0.6:
        problem.append("{name} felt {sad} and alone.")
    resolution = [rng.choice([
        "Then {fname} came by and said, \"I know the way. Follow me!\"",
        "{name} remembered {landmark} and walked toward it.",
    ])]
    resolution.append(rng.choice([
        "Soon {he} was home, and {his} {parent} gave {him} a big hug.",
        "At last {name} saw {his} house and ran inside.",
    ]))
    endings = [
        "{name} promised to stay close to home next time.",
        "{name} was safe and {happy} to be home.",
    ]
    morals = [
        "you should always stay close to your family",
        "it is important to know the way home",
    ]
    return setup, problem, resolution, endings, morals


def _plot_try(rng: random.Random, c: dict) -> _Plot:
    skill = rng.choice(["ride a bike", "build a tall tower", "climb the big hill",
                        "swim", "tie {his} shoes", "fly a kite", "jump over the log",
                        "catch a ball", "write {his} name"])
    c["skill"] = skill.format(**c)
    setup = rng.choice([
        "One day, {name} wanted to learn to {skill}.",
        "{name} went to {place} because {he} wanted to {skill}.",
    ])
    problem = [rng.choice([
        "{He} tried, but {he} fell down.",
        "It was hard, and {he} failed again and again.",
    ])]
    if rng.random() < 0.5:
        problem.append("{name} felt {sad} and wanted to give up.")
    resolution = [rng.choice([
        "{fname} said, \"Don't give up! Try one more time.\"",
        "{His} {parent} said, \"You can do it. Just keep trying.\"",
    ])]
    resolution.append(rng.choice([
        "So {name} tried again, and this time {he} did it!",
        "{name} practiced every day, and at last {he} could {skill}.",
    ]))
    endings = [
        "{name} felt very proud of {himself}.",
        "{name} jumped up and down and cheered.",
    ]
    morals = [
        "you should never give up",
        "practice makes things easier",
        "if you keep trying, you can do hard things",
    ]
    return setup, problem, resolution, endings, morals


def _plot_fight(rng: random.Random, c: dict) -> _Plot:
    c["game"] = rng.choice(["who could go first on the swing", "whose turn it was",
                            "who had the best {objn}", "which game to play",
                            "who would be the leader"]).format(**c)
    setup = rng.choice([
        "One day, {name} and {fname} were playing {at_place}.",
        "{name} and {fname} went to {place} to play together.",
    ])
    problem = [rng.choice([
        "Soon they started to fight about {game}.",
        "But then they argued about {game}.",
    ])]
    problem.append(rng.choice([
        "{fname} got angry and went home.",
        "They both felt angry and stopped playing.",
    ]))
    resolution = [rng.choice([
        "Later, {name} missed {fname} and said, \"I'm sorry.\"",
        "The next day, {name} went to {fname} and said sorry.",
    ])]
    if rng.random() < 0.5:
        resolution.append("{fname} smiled and said, \"I'm sorry too.\"")
    endings = list(_FRIEND_ENDINGS)
    morals = [
        "saying sorry can make things right",
        "friends are more important than being first",
    ]
    return setup, problem, resolution, endings, morals


def _plot_gift(rng: random.Random, c: dict) -> _Plot:
    c["gift"] = rng.choice(["a card with a big heart", "a necklace of flowers",
                            "a picture of them together", "a little cake",
                            "a paper crown", "a box of shiny stones"])
    setup = rng.choice([
        "One day, {name} found out that it was {fname}'s birthday.",
        "{name} wanted to make {fname} happy because {fhe} was {sad}.",
    ])
    problem = [rng.choice([
        "But {name} had no money to buy a present.",
        "{name} did not know what to give {fhim}.",
    ])]
    resolution = [rng.choice([
        "So {he} made {gift} all by {himself}.",
        "{His} {parent} helped {him} make {gift}.",
    ])]
    resolution.append(rng.choice([
        "When {fname} saw it, {fhe} was so {happy} that {fhe} jumped for joy.",
        "{fname} smiled and said, \"This is the best present ever!\"",
    ]))
    endings = list(_FRIEND_ENDINGS)
    morals = [
        "the best gifts come from the heart",
        "making others happy makes you happy too",
    ]
    return setup, problem, resolution, endings, morals


def _plot_clean(rng: random.Random, c: dict) -> _Plot:
    c["at_home"] = True
    setup = rng.choice([
        "One day, {name}'s {parent} said, \"Please clean up your room.\"",
        "{name}'s room was very messy, with toys everywhere.",
    ])
    problem = [rng.choice([
        "{name} did not want to clean, because {he} wanted to {activity}.",
        "{name} said, \"But cleaning is boring!\"",
    ])]
    resolution = [rng.choice([
        "Then {fname} came and said, \"Let's make it a game!\"",
        "{His} {parent} said, \"Let's see how fast you can do it.\"",
    ])]
    resolution.append(rng.choice([
        "While cleaning, {name} found {his} lost {obj} under the bed.",
        "Soon the room was clean and shiny.",
    ]))
    endings = [
        "{name} was {happy} and proud of {his} clean room.",
        "Then {name} could {activity}, and it was even more fun.",
    ]
    morals = [
        "hard work can be fun",
        "it feels good to finish your work",
    ]
    return setup, problem, resolution, endings, morals


_PLOTS: list[Callable[[random.Random, dict], _Plot]] = [
    _plot_lost, _plot_stuck, _plot_broken, _plot_share, _plot_rain, _plot_fear,
    _plot_hurt, _plot_bird, _plot_lost_way, _plot_try, _plot_fight, _plot_gift,
    _plot_clean,
]


def _context(rng: random.Random) -> dict:
    """Draws the cast, setting and props of one story as format-string fields."""
    hero = _character(rng)
    friend = _character(rng, avoid=hero["name"])
    place = rng.choice(_PLACES)
    c: dict = {
        "name": hero["name"], "kind": hero["kind"], "say": hero["say"],
        "move": hero["move"], "trait": rng.choice(_TRAITS),
        "fname": friend["name"], "fkind": friend["kind"], "fsay": friend["say"],
        "fanimal": friend["animal"],
        "place": place["name"], "at_place": f"{place['prep']} {place['name']}",
        "place_detail": rng.choice(place["details"]),
        "spot": rng.choice(place["spots"]),
        "parent": rng.choice(_PARENTS),
        "happy": rng.choice(_HAPPY), "sad": rng.choice(_SAD),
    }
    c.update(_pronouns(hero["female"]))
    c["himself"] = "herself" if hero["female"] else "himself"
    c.update(_pronouns(friend["female"], prefix="f"))
    # Later mentions use the bare noun ("the kite"), as a child's story would.
    c["obj"], c["objn"] = _object_phrase(rng)
    # Activities may themselves refer to pronouns or the parent.
    c["activity"] = rng.choice(_ACTIVITIES).format(**c)
    return c


def compose_story(rng: random.Random) -> list[str]:
    """Builds one story as a list of sentences, drawing every choice from ``rng``.

    Args:
        rng: The random source; the story depends only on its state.

    Returns:
        Between ``MIN_SENTENCES`` and ``MAX_SENTENCES`` sentences which, joined with
        spaces, form the story. A line of dialogue with its speaker counts as one.
    """
    c = _context(rng)
    plot = rng.choice(_PLOTS)
    setup, problem, resolution, endings, morals = plot(rng, c)
    generic = _GENERIC_ENDINGS
    if c.get("at_home"):
        generic = [e for e in generic if "went home" not in e]
    ending = rng.choice(endings + generic)
    # A two-sentence resolution already closes the story; dropping the ending now
    # and then varies story length down to MIN_SENTENCES.
    drop_ending = len(resolution) >= 2 and rng.random() < 0.2

    opening = rng.choice([
        "Once upon a time, there was {a_trait_kind} named {name}.",
        "Once upon a time, there lived {a_trait_kind} called {name}.",
        "There once was {a_trait_kind} named {name}.",
        "{name} was {a_trait_kind} who loved to {activity}.",
    ])
    c["a_trait_kind"] = _a(f"{c['trait']} {c['kind']}")

    optional: list[tuple[int, str]] = []  # (position, sentence), inserted if room
    if rng.random() < 0.5 and "loved to" not in opening:
        optional.append((1, rng.choice([
            "{He} loved to {activity}.",
            "{His} favorite thing was {his} {obj}.",
            "{He} had {a_obj} that {he} loved very much.",
            "Every day, {he} liked to {activity}.",
        ])))
    c["a_obj"] = _a(c["obj"])
    if rng.random() < 0.3:
        optional.append((2, rng.choice(_WEATHER + [c["place_detail"]])))
    moral = None
    if rng.random() < 0.4:
        moral = rng.choice(_MORAL_FRAMES).replace("{moral}", rng.choice(morals))

    sentences = [opening, setup, *problem, *resolution]
    if not drop_ending:
        sentences.append(ending)
    # Insert from the back so earlier positions stay valid.
    for pos, sent in sorted(optional, reverse=True):
        if len(sentences) < MAX_SENTENCES:
            sentences.insert(pos, sent)
    if moral is not None and len(sentences) < MAX_SENTENCES:
        sentences.append(moral)
    return [_cap(s.format(**c)) for s in sentences]


def generate_stories(n: int, seed: int = 0) -> list[str]:
    """Generates ``n`` distinct stories, the same for a given seed on every machine.

    The stories come from one random stream, so ``generate_stories(m, s)`` is a prefix
    of ``generate_stories(n, s)`` for ``m <= n``. Duplicates are redrawn, so that a
    story cannot land in both the training and the validation split.

    Args:
        n: How many stories to generate (non-negative).
        seed: Seed of the ``random.Random`` that drives every choice.

    Returns:
        The stories, each 4-8 sentences of plain text.

    Raises:
        ValueError: If ``n`` is negative, or so large that the templates cannot
            produce that many distinct stories.
    """
    if n < 0:
        raise ValueError(f"generate_stories: n must be >= 0, got {n}")
    rng = random.Random(seed)
    seen: set[str] = set()  # membership only; never iterated, so hashing is harmless
    out: list[str] = []
    redraws = 0
    while len(out) < n:
        story = " ".join(compose_story(rng))
        if story in seen:
            redraws += 1
            if redraws > 100 + n:
                raise ValueError(
                    f"generate_stories: could not draw {n} distinct stories; "
                    "ask for fewer or pass a real data file")
            continue
        seen.add(story)
        out.append(story)
    return out
