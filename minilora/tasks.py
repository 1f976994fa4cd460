"""Built-in data for the quickstart: a pretraining corpus and three fine-tuning tasks, no network.

    text = stdlib_corpus()                                  # Python's own documentation, ~1 MB
    train, val = make_task("sql", 2000, 200, seed=0)        # [{"prompt": ..., "completion": ...}]
    train, val = make_task("chat", 2000, 200, seed=0)       # [{"messages": [...]}]: TRL's conversations
    write_jsonl(train, "out/data/sql_train.jsonl")
    exact_match_accuracy(model, tokenizer, val)             # greedy decoding, 0.0 .. 1.0
    exact_match_accuracy(model, tokenizer, val, chat_template=template)   # the final answer of each conversation

The corpus is text that ships with every Python installation: the help topics behind `help()`
(`pydoc_data.topics`) and the docstrings of a fixed list of standard-library modules. The tasks
are generated from templates with a seeded RNG, so every machine builds the same examples:

- "sql":   "Request: how many users live in Oslo?\nSQL: " -> "SELECT COUNT(*) FROM users WHERE city = 'Oslo';"
- "dates": "Convert 2024-03-05 to words.\nAnswer: "      -> "March 5, 2024" (and the reverse)
- "chat":  user "Book Ana in Oslo on Fri.", assistant "Booked: Ana, Oslo, Fri.", user "Now on Sun."
           -> assistant "Booked: Ana, Oslo, Sun." (TRL's {"messages": [...]}: the answer needs both turns)

All three need copying (numbers, names) plus a mapping (phrase -> clause, month number -> name,
a change -> the detail it replaces), which a tiny byte-level model learns in minutes but never
produces without fine-tuning.
"""

import calendar
import importlib
import inspect
import json
import random
import warnings

from minilora.chat import chat_tokens, stop_tokens
from minilora.errors import MiniloraError
from minilora.fileio import atomic_open
from minilora.generation import generate

# ---- pretraining corpus ---------------------------------------------------------------------

# Pure-library modules that import without side effects (no GUI, no "this"/"antigravity" easter
# eggs, nothing that starts threads or touches the network). Order is fixed so the corpus is too.
CORPUS_MODULES = [
    "abc", "argparse", "array", "ast", "base64", "bisect", "calendar", "cmath", "collections",
    "colorsys", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "dis", "email.message", "enum", "filecmp", "fnmatch", "fractions", "functools", "gettext",
    "glob", "gzip", "hashlib", "heapq", "hmac", "html", "html.parser", "http.client", "inspect",
    "io", "ipaddress", "itertools", "json", "logging", "lzma", "math", "mimetypes", "operator",
    "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "sched", "secrets", "shlex",
    "shutil", "socket", "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "time", "timeit", "tokenize", "typing", "unittest",
    "urllib.parse", "uuid", "warnings", "weakref", "zipfile", "zlib",
]


def _docstrings(module):
    """The module's docstring, then each public object's (and each class's public methods'), sorted by name."""
    yield inspect.getdoc(module)
    for name in sorted(n for n in dir(module) if not n.startswith("_")):
        obj = getattr(module, name, None)
        if inspect.ismodule(obj):
            continue  # e.g. os.path: documented under its own name, not as part of this one
        yield inspect.getdoc(obj) if callable(obj) else None
        if inspect.isclass(obj):
            for attr in sorted(n for n in vars(obj) if not n.startswith("_")):
                member = getattr(obj, attr, None)
                yield inspect.getdoc(member) if callable(member) else None


def stdlib_corpus(max_chars=None):
    """pydoc's help topics + stdlib docstrings as one string; identical on every run of one Python version."""
    from pydoc_data.topics import topics  # the text behind help("if"), help("FORMATTING"), ...

    pieces = [topics[key].strip() for key in sorted(topics)]
    seen = set(pieces)
    for mod_name in CORPUS_MODULES:
        try:
            module = importlib.import_module(mod_name)
        except ImportError:
            continue  # e.g. a Python built without sqlite3 or lzma
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # getattr(typing, "re") and co. warn
            for doc in _docstrings(module):
                # inherited docstrings (object.__init__ and co.) repeat hundreds of times; keep one
                if doc and len(doc) >= 40 and doc not in seen:
                    seen.add(doc)
                    pieces.append(doc)
    text = "\n\n".join(pieces) + "\n"
    return text if max_chars is None else text[:max_chars]


def write_corpus(path, max_chars=None):
    """Write stdlib_corpus() to a UTF-8 text file (atomically); returns the number of characters."""
    text = stdlib_corpus(max_chars)
    with atomic_open(path, "wb") as f:  # bytes: UTF-8 whatever the locale's default encoding
        f.write(text.encode("utf-8"))
    return len(text)


# ---- task "sql" -----------------------------------------------------------------------------

SQL_SCHEMA = "users(id, name, age, city), orders(id, user_id, amount, status)"
CITIES = ["Paris", "London", "Berlin", "Tokyo", "Lima", "Cairo", "Oslo", "Rome", "Madrid",
          "Dublin", "Austin", "Boston", "Seoul", "Delhi", "Quito", "Vienna"]
STATUSES = ["paid", "pending", "shipped", "cancelled", "refunded"]
USER_COLUMNS = {"names": "name", "ages": "age", "cities": "city", "ids": "id"}
AGE_OPS = {"older than": ">", "younger than": "<", "aged exactly": "="}
AMOUNT_OPS = {"over": ">", "under": "<"}
AGGREGATES = {"total": "SUM", "average": "AVG", "largest": "MAX", "smallest": "MIN"}
VERBS = ["show", "list", "find", "get"]
# Values come from small sets: a model of a few hundred thousand parameters learns to carry a value
# it has seen often across, but copying arbitrary digit strings would take it far longer than the
# quickstart's minutes. Held-out prompts are still new combinations of template, verb and values.
AGES, AMOUNTS, LIMITS, USER_IDS = range(20, 75, 5), [50, 100, 200, 250, 500, 750, 1000], [3, 5, 10, 20], range(1, 21)
JOIN = "FROM users JOIN orders ON users.id = orders.user_id"


def _sql_example(rng):
    """One (request, query) pair from a randomly chosen template."""
    city, status, verb = rng.choice(CITIES), rng.choice(STATUSES), rng.choice(VERBS)
    words, col = rng.choice(list(USER_COLUMNS.items()))
    age, amount, k, uid = rng.choice(AGES), rng.choice(AMOUNTS), rng.choice(LIMITS), rng.choice(USER_IDS)
    phrase, op = rng.choice(list(AGE_OPS.items()))
    more, amount_op = rng.choice(list(AMOUNT_OPS.items()))
    agg_words, agg = rng.choice(list(AGGREGATES.items()))
    templates = [
        (f"{verb} the {words} of users {phrase} {age}", f"SELECT {col} FROM users WHERE age {op} {age};"),
        (f"{verb} the {words} of users who live in {city}", f"SELECT {col} FROM users WHERE city = '{city}';"),
        (f"how many users live in {city}?", f"SELECT COUNT(*) FROM users WHERE city = '{city}';"),
        (f"count the users {phrase} {age}", f"SELECT COUNT(*) FROM users WHERE age {op} {age};"),
        (f"{verb} the {k} oldest users", f"SELECT * FROM users ORDER BY age DESC LIMIT {k};"),
        (f"{verb} the {k} youngest users", f"SELECT * FROM users ORDER BY age ASC LIMIT {k};"),
        (f"{verb} the {words} of users in {city} sorted by age",
         f"SELECT {col} FROM users WHERE city = '{city}' ORDER BY age;"),
        (f"{verb} orders with an amount {more} {amount}", f"SELECT * FROM orders WHERE amount {amount_op} {amount};"),
        (f"{verb} all {status} orders", f"SELECT * FROM orders WHERE status = '{status}';"),
        (f"what is the {agg_words} amount of {status} orders?",
         f"SELECT {agg}(amount) FROM orders WHERE status = '{status}';"),
        (f"what is the average age of users in {city}?", f"SELECT AVG(age) FROM users WHERE city = '{city}';"),
        (f"how many orders has user {uid} placed?", f"SELECT COUNT(*) FROM orders WHERE user_id = {uid};"),
        (f"{verb} the names of users with {status} orders",
         f"SELECT users.name {JOIN} WHERE orders.status = '{status}';"),
        (f"{verb} the names of users who placed an order {more} {amount}",
         f"SELECT users.name {JOIN} WHERE orders.amount {amount_op} {amount};"),
    ]
    request, query = rng.choice(templates)
    return {"prompt": f"Request: {request}\nSQL: ", "completion": query}


# ---- task "dates" ---------------------------------------------------------------------------

# Spelled out rather than calendar.month_name, which follows the process locale.
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]


def _dates_example(rng):
    """ISO date -> "Month D, YYYY", or the reverse, with equal odds."""
    year, month = rng.randint(1980, 2029), rng.randint(1, 12)  # 50 years: see AGES
    day = rng.randint(1, calendar.monthrange(year, month)[1])
    iso, words = f"{year:04d}-{month:02d}-{day:02d}", f"{MONTHS[month - 1]} {day}, {year}"
    if rng.random() < 0.5:
        return {"prompt": f"Convert {iso} to words.\nAnswer: ", "completion": words}
    return {"prompt": f"Convert {words} to ISO format.\nAnswer: ", "completion": iso}


# ---- task "chat" ----------------------------------------------------------------------------

# A booking assistant: the user asks for a table, the assistant confirms it, the user changes one
# detail ("Now on Fri."), and the assistant confirms the whole booking again, so the final answer
# needs the first turn (the two details that did not change) as well as the last line. Each detail
# is copied, from the request or from the earlier confirmation: the copying "sql" shows this base
# learns in minutes. Measured dead ends (600 steps x 16, the quickstart's base): answering questions
# about a table held in the system prompt (a lookup: 10%), and details given as digits ("for 8",
# "at 8pm": 54.5% and 5% on two runs; a causal model reading "8" cannot yet see the "pm" after it,
# and the changes of a digit went wrong). So every detail is a word from its own set, after a word
# that says which detail it is ("for Ana", "in Oslo", "on Fri").
# Everything is short because the quickstart's base was pretrained on 128-byte rows: its learned
# position embeddings past 128 are untrained (LoRA adapts linear layers, not embeddings), so a
# whole conversation, rendered with the "plain" template, is at most CHAT_MAX_TOKENS byte tokens
# (inputs at positions 0..127, each predicting the next).
CHAT_NAMES = ["Ana", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Ida", "Jo", "Kai", "Liv", "Max"]
CHAT_CITIES = ["Paris", "Tokyo", "Lima", "Cairo", "Oslo", "Rome", "Seoul", "Delhi", "Quito", "Riga", "Bern",
               "Kyiv", "Dhaka", "Accra", "Lagos", "Perth"]  # 16 as for "sql", none over 5 letters
CHAT_DAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
CHAT_VALUES = {"name": CHAT_NAMES, "city": CHAT_CITIES, "day": CHAT_DAYS}
CHAT_ASK = ["Book {name} in {city} on {day}.", "Book {city} on {day} for {name}.", "On {day}, book {city} for {name}."]
CHAT_CHANGE = {"name": "Now for {}.", "city": "Now in {}.", "day": "Now on {}."}
CHAT_MAX_TOKENS = 129


def _booked(b):
    return f"Booked: {b['name']}, {b['city']}, {b['day']}."


def _chat_example(rng):
    """A request, its confirmation, a change to one detail and (last) the new confirmation."""
    booking = {key: rng.choice(values) for key, values in CHAT_VALUES.items()}
    key = rng.choice(list(booking))
    changed = {**booking, key: rng.choice([v for v in CHAT_VALUES[key] if v != booking[key]])}
    return {"messages": [{"role": "user", "content": rng.choice(CHAT_ASK).format(**booking)},
                         {"role": "assistant", "content": _booked(booking)},
                         {"role": "user", "content": CHAT_CHANGE[key].format(changed[key])},
                         {"role": "assistant", "content": _booked(changed)}]}


TASKS = {"sql": _sql_example, "dates": _dates_example, "chat": _chat_example}


def task_prompt(example):
    """What the model is given: the prompt string, or the conversation up to the final answer."""
    return example["messages"][:-1] if "messages" in example else example["prompt"]


def task_answer(example):
    """What it must produce: the completion, or the conversation's final assistant turn."""
    return example["messages"][-1]["content"] if "messages" in example else example["completion"]


def make_task(name, n_train, n_val, seed=0):
    """(train, val): lists of {"prompt", "completion"} dicts ({"messages"} for "chat"), no prompt in
    both, same for the same seed."""
    if name not in TASKS:
        raise MiniloraError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    if n_train < 0 or n_val < 0:
        raise MiniloraError(f"make_task: n_train and n_val must be >= 0, got {n_train} and {n_val}")
    rng, examples, seen = random.Random(seed), [], set()
    attempts, need = 0, n_train + n_val
    while len(examples) < need:
        attempts += 1
        if attempts > 50 * need + 1000:  # the templates cannot make that many distinct prompts
            raise MiniloraError(f"task {name!r} produced only {len(examples)} distinct examples; ask for fewer")
        ex = TASKS[name](rng)
        key = json.dumps(task_prompt(ex))
        if key not in seen:  # distinct prompts keep the held-out split truly held out
            seen.add(key)
            examples.append(ex)
    return examples[:n_train], examples[n_train:]


def write_jsonl(examples, path):
    """One JSON object per line, written atomically; returns the path."""
    with atomic_open(path, "wb") as f:
        for ex in examples:
            f.write((json.dumps(ex, ensure_ascii=False) + "\n").encode("utf-8"))
    return path


# ---- evaluation -----------------------------------------------------------------------------


def greedy_completions(model, tokenizer, prompts, max_new_tokens=64, batch_size=32, chat_template=None):
    """Greedy continuation of each prompt, up to its end-of-text token (or max_new_tokens).

    A prompt is a string, or a conversation (a list of messages ending with a user turn), which is
    rendered by chat_template as training rendered it (chat_tokens) and answered up to its end of turn."""
    conversations = [p for p in prompts if not isinstance(p, str)]
    if conversations and chat_template is None:
        raise MiniloraError("greedy_completions: conversations need the chat_template they were trained with")
    eos, stops = stop_tokens(tokenizer, chat_template) if conversations else (tokenizer.eos_token_ids, None)
    # as in training: BOS first where expected; a conversation's ids exactly as its training tokens
    encoded = [tokenizer.encode_document(p) if isinstance(p, str) else
               chat_tokens(tokenizer, chat_template, p, add_generation_prompt=True)[0] for p in prompts]
    # Batch prompts of similar length together so little compute goes to left padding.
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    outputs = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        out = generate(model, [encoded[i] for i in chunk], max_new_tokens, temperature=0.0,
                       eot_token=eos, stop=stops or None, tokenizer=tokenizer)
        for i, tokens in zip(chunk, out.tokens):  # tokens stop before the eot
            outputs[i] = tokenizer.decode(tokens)
    return outputs


def exact_match_accuracy(model, tokenizer, examples, max_new_tokens=64, batch_size=32, chat_template=None):
    """Fraction of examples whose greedy completion (a conversation's final answer, given the turns
    before it) equals the reference, whitespace-stripped."""
    if not examples:
        raise MiniloraError("exact_match_accuracy: no examples to evaluate")
    preds = greedy_completions(model, tokenizer, [task_prompt(ex) for ex in examples], max_new_tokens, batch_size,
                               chat_template)
    return sum(p.strip() == task_answer(ex).strip() for p, ex in zip(preds, examples)) / len(examples)
