"""Varied training prompts for a draft head (``decodekit train-drafter``).

A head learns what its target says about a *kind* of prompt, so the prompts it trains on span
many kinds: questions, explanations, instructions and steps, lists, comparisons, advice,
stories and poems, letters and product copy, code, arithmetic word problems, role play, and
(``passage_prompts``, built from the target's own earlier answers) summarising, rewriting,
extracting and answering from a given text, the copying work of grounded prompts.

Held out: every prompt of the benchmark suites, and the subjects of the chat suite
(``HELD_OUT_WORDS``: no training prompt mentions them), so held-out acceptance measures
generalisation to new subjects and new phrasings, not recall.
"""

from __future__ import annotations

import random
import re

__all__ = ["KINDS", "HELD_OUT_WORDS", "training_prompts", "passage_prompts", "kind_of", "mentions_held_out"]

# the chat suite's subjects (decodekit/data/chat.jsonl): no training prompt names them
HELD_OUT_WORDS = ("sky", "robot", "language", "cat", "cats", "dog", "dogs", "bicycle", "lunch", "photosynthesis",
                  "breakfast", "autumn", "leaves", "tea", "weather", "climate", "camping", "water cycle",
                  "interview", "bottle", "exercise")

TOPICS = [
    "volcanoes", "the Roman Empire", "machine learning", "coffee", "honeybees", "the moon landing", "electric cars",
    "chess", "jazz music", "ancient Egypt", "black holes", "the human heart", "recycling", "the internet",
    "dinosaurs", "gardening", "the stock market", "origami", "rainforests", "vaccines", "the printing press",
    "penguins", "solar panels", "the French Revolution", "yoga", "earthquakes", "video games", "chocolate",
    "the immune system", "trains", "Shakespeare", "friendship", "time management", "the ocean", "bread baking",
    "mountains", "smartphones", "public libraries", "sleep", "bridges", "the Olympic Games", "mushrooms", "kites",
    "the periodic table", "volunteering", "deserts", "glaciers", "the Great Wall of China", "vikings",
    "submarines", "the piano", "microscopes", "coral reefs", "bees and pollination", "the Renaissance",
    "3D printing", "wind turbines", "octopuses", "the Amazon river", "antibiotics", "democracy", "taxes",
    "the metric system", "lighthouses", "castles", "pyramids", "comets", "the speed of light", "magnets",
    "batteries", "rainbows", "tornadoes", "hurricanes", "elephants", "whales", "owls", "sharks", "ants",
    "spiders", "rice farming", "cheese making", "pizza", "sushi", "spices", "vegetarian cooking", "budgeting",
    "saving money", "credit cards", "public speaking", "meditation", "running a marathon", "swimming",
    "photography", "painting with watercolors", "knitting", "pottery", "board games", "podcasts", "newspapers",
    "social media", "online privacy", "passwords", "cloud computing", "databases", "open source software",
    "robotics competitions", "space telescopes", "Mars", "the International Space Station", "satellites",
    "GPS", "airplanes", "hot air balloons", "ships", "the Silk Road", "ancient Greece", "the Industrial Revolution",
    "the Cold War", "museums", "architecture", "skyscrapers", "city parks", "traffic", "electric scooters",
    "nuclear power", "clean drinking water", "forests", "wildfires", "bird migration", "frogs", "butterflies",
    "the human brain", "memory", "habits", "procrastination", "kindness", "teamwork", "leadership",
    "starting a small business", "customer service", "remote work", "moving to a new city", "houseplants",
    "composting", "beekeeping", "fishing", "sailing", "rock climbing", "snowboarding", "the guitar", "opera",
    "movies", "comic books", "poetry", "mythology", "fairy tales", "calendars", "clocks", "maps", "money",
]

CODE_TASKS = [
    "reverses a string", "checks whether a number is prime", "returns the largest item in a list",
    "counts the vowels in a string", "computes the factorial of n", "returns the n-th Fibonacci number",
    "removes duplicates from a list while keeping the order", "checks whether a word is a palindrome",
    "converts Celsius to Fahrenheit", "merges two sorted lists", "counts how often each word appears in a text",
    "returns the average of a list of numbers", "flattens a list of lists", "finds the second smallest number",
    "checks whether two strings are anagrams", "sums the digits of an integer", "capitalizes every word",
    "returns the even numbers of a list", "computes the greatest common divisor of two numbers",
    "reads a text file and returns its number of lines", "sorts a list of names by length",
    "checks whether a year is a leap year", "converts a list of pairs into a dictionary",
    "returns the most common character in a string", "validates a simple email address",
]
CODE_LANGUAGES = ["Python", "Python", "Python", "JavaScript", "Java", "C", "Rust", "Go"]

FORMS = {
    "question": ["Tell me about {t}.", "What is the history of {t}?", "What are some interesting facts about {t}?",
                 "Why do people care about {t}?", "What is the most surprising thing about {t}?",
                 "Who should learn about {t}, and why?", "What are common myths about {t}?"],
    "explain": ["Explain {t} to a beginner.", "Describe how {t} works to a ten-year-old.",
                "Explain {t} in simple words.", "Give a short explanation of {t} for a school report.",
                "Can you explain the basics of {t}?"],
    "steps": ["How do I get started with {t}? Give the steps.", "Give me a step-by-step guide to learning about {t}.",
              "What steps would a beginner take to understand {t}?"],
    "list": ["List five facts about {t}.", "Give me three questions to ask about {t}, with short answers.",
             "Write a bulleted list of the key ideas of {t}.", "Name four important words related to {t} and "
             "define each.", "List the pros and cons of {t}."],
    "compare": ["Compare {t} and {u}.", "What do {t} and {u} have in common?",
                "What are the main differences between {t} and {u}?"],
    "advice": ["Give me a few tips related to {t}.", "I am new to {t}. What advice would you give me?",
               "What mistakes do beginners make with {t}?", "How can a busy person find time for {t}?"],
    "creative": ["Write a short poem about {t}.", "Write a short story involving {t}.",
                 "Write a haiku about {t}.", "Write a funny limerick about {t}.",
                 "Write a short dialogue between two friends talking about {t}.",
                 "Write the opening paragraph of a mystery novel that involves {t}."],
    "writing": ["Write a short paragraph about {t}.", "Write a blog post introduction about {t}.",
                "Write a friendly email to a friend about {t}.", "Write a short speech about {t} for a school "
                "assembly.", "Write a short advertisement for a class about {t}.",
                "Write a formal letter to a city council asking for more support for {t}.",
                "Write a short review of a book about {t}.", "Write a tweet about {t}."],
    "summary": ["Summarize the most important things to know about {t}.", "Give me a one-sentence summary of {t}.",
                "What are the pros and cons of {t}?", "In three sentences, what is {t}?"],
    "roleplay": ["Pretend you are a museum guide and tell visitors about {t}.",
                 "You are a teacher. Introduce today's lesson on {t}.",
                 "Act as a tour guide and describe {t} to tourists.",
                 "Answer as a friendly expert: why is {t} worth learning about?"],
}
CODE_FORMS = ["Write a {lang} function that {task}.", "Show me how to write a {lang} function that {task}, "
              "and explain it.", "Write a {lang} function that {task}. Add a short docstring and an example."]
MATH_FORMS = ["A shop sells pens for {a} dollars each. How much do {b} pens cost? Explain your answer.",
              "Tom has {a} apples and gives {b} to his friend. How many apples does he have left?",
              "A train travels {a} kilometres per hour. How far does it go in {b} hours?",
              "What is {a} times {b}? Show your working.", "What is {a} plus {b}, and is the result even or odd?",
              "A class has {a} students and {b} of them are absent. What fraction of the class is present?"]

PASSAGE_FORMS = [
    "Summarize the following text in two sentences.\n\nText: {p}",
    "Rewrite the following text in simpler words.\n\nText: {p}",
    "Turn the following text into a bulleted list of its main points.\n\n{p}",
    "Read the text below and answer: what is its main idea? Quote one sentence that supports it.\n\n{p}",
    "Make the following text more formal.\n\n{p}",
    "Give this text a title and a one-line summary.\n\n{p}",
    "Correct any mistakes in the following text and return the corrected text.\n\n{p}",
    "Write three quiz questions, with answers, about the following text.\n\n{p}",
]

KINDS = tuple(FORMS) + ("code", "math", "passage")


def _word_pattern(words) -> re.Pattern:
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)


HELD_OUT = _word_pattern(HELD_OUT_WORDS)


def mentions_held_out(text: str) -> bool:
    """True when ``text`` names a subject of the chat suite (``HELD_OUT_WORDS``)."""
    return HELD_OUT.search(text) is not None


def _candidates(kind: str, rng: random.Random) -> list[str]:
    """Every prompt of one kind (the math ones with ``rng``'s numbers), in a fixed order."""
    if kind == "code":
        return [f.format(lang=lang, task=task) for f in CODE_FORMS for lang in dict.fromkeys(CODE_LANGUAGES)
                for task in CODE_TASKS]
    if kind == "math":
        drawn = [f.format(a=rng.randint(13, 90), b=rng.randint(2, 12)) for f in MATH_FORMS for _ in range(40)]
        return list(dict.fromkeys(drawn))
    topics = [t for t in TOPICS if not mentions_held_out(t)]
    pairs = list(zip(topics, topics[1:] + topics[:1]))
    return [f.format(t=t, u=u) for f in FORMS[kind] for t, u in pairs]


def training_prompts(num_prompts: int | None, seed: int, kinds: tuple[str, ...] | None = None) -> list[str]:
    """``num_prompts`` (None: all) held-in prompts drawn round-robin over ``kinds`` (default: every kind but
    ``passage``, which needs text: ``passage_prompts``), shuffled by ``seed``; none of them in
    the benchmark suites or naming a subject of the chat suite."""
    from decodekit.suites import SUITES, load_suite
    from decodekit.validation import DecodeKitError, check_int

    kinds = tuple(k for k in KINDS if k != "passage") if kinds is None else kinds
    unknown = [k for k in kinds if k not in KINDS or k == "passage"]
    if unknown or not kinds:
        raise DecodeKitError(f"kinds must be among {[k for k in KINDS if k != 'passage']}, got {list(kinds)}")
    held_out = {r["prompt"] for name in SUITES for r in load_suite(name)}
    rng = random.Random(seed)
    pools = []
    for kind in kinds:
        pool = [p for p in _candidates(kind, rng) if p not in held_out and not mentions_held_out(p)]
        rng.shuffle(pool)
        pools.append(pool)
    available = sum(len(p) for p in pools)
    num_prompts = available if num_prompts is None else num_prompts
    check_int("num_prompts", num_prompts, min_value=1, max_value=available)
    prompts, i = [], 0
    while len(prompts) < num_prompts:  # round-robin: every kind equally, while it lasts
        pool = pools[i % len(pools)]
        if pool:
            prompts.append(pool.pop())
        i += 1
    rng.shuffle(prompts)
    return prompts


def passage_prompts(answers: list[str], seed: int, max_words: int = 90) -> list[str]:
    """Prompts that hand the target a text (one of its own earlier ``answers``, cut to
    ``max_words`` words at a sentence end) to summarise, rewrite, list, quote or correct."""
    rng = random.Random(seed)
    prompts = []
    for answer in answers:
        words = answer.split()
        if len(words) < 25 or mentions_held_out(answer):
            continue
        text = " ".join(words[:max_words])
        end = max(text.rfind(". "), text.rfind(".\n"))
        text = text[: end + 1] if end > len(text) // 2 else text
        prompts.append(rng.choice(PASSAGE_FORMS).format(p=text))
    return prompts


def _form_pattern(form: str) -> re.Pattern:
    parts = re.split(r"\{[a-z]+\}", form)
    return re.compile("(?s)" + "(.+)".join(re.escape(part) for part in parts))


FORM_PATTERNS = [(kind, _form_pattern(f)) for kind, forms in FORMS.items() for f in forms] + [
    ("code", _form_pattern(f)) for f in CODE_FORMS] + [("math", _form_pattern(f)) for f in MATH_FORMS] + [
    ("passage", _form_pattern(f)) for f in PASSAGE_FORMS]


def kind_of(prompt: str) -> str:
    """The kind a prompt of ``training_prompts`` / ``passage_prompts`` was written as ("other":
    none of them)."""
    return next((kind for kind, pattern in FORM_PATTERNS if pattern.fullmatch(prompt)), "other")
