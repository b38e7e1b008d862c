"""The default user task: GSM8K-style arithmetic word problems, generated from a seed.

Ten templates (shopping, ages, speeds, sharing, savings, ...), 1 to 3 operations on small integers,
solutions written step by step and ending "The final answer is N." as in the peers' GSM8K protocol
(Huang et al.), so accuracy is the number after "The final answer is".
"""
import hashlib
import random


def hash_split(text: str) -> str:
    """A fixed train/test assignment of a prompt: 1 in 5 goes to test."""
    return "test" if hashlib.sha256(text.encode()).digest()[0] % 5 == 0 else "train"


# Each template draws small integers and returns (question, solution steps, answer); 1 to 3
# operations, every intermediate result a non-negative integer, the steps in "a op b = c" form.
_NAMES = [("Maya", "she", "her"), ("Tom", "he", "his"), ("Aisha", "she", "her"), ("Lucas", "he", "his"),
          ("Priya", "she", "her"), ("Omar", "he", "his"), ("Elena", "she", "her"), ("Kenji", "he", "his"),
          ("Sofia", "she", "her"), ("Daniel", "he", "his"), ("Zara", "she", "her"), ("Liam", "he", "his"),
          ("Chloe", "she", "her"), ("Mateo", "he", "his"), ("Nadia", "she", "her"), ("Ben", "he", "his")]
_ITEMS = ["notebooks", "apples", "pens", "cupcakes", "comic books", "sticker packs", "sandwiches",
          "bottles of juice", "candles", "toy cars"]


def _shopping(r, a, b):
    (name, he, _), (items, items2) = a, r.sample(_ITEMS, 2)
    k, p, ops = r.randint(2, 9), r.randint(1, 12), r.randint(1, 3)
    steps = [f"{k} {items} at ${p} each cost {k} * {p} = ${k * p}."]
    if ops == 1:
        return f"{name} buys {k} {items} that cost ${p} each. How many dollars does {he} spend?", steps, k * p
    if ops == 2:
        bill = r.choice([x for x in (20, 50, 100, 200) if x > k * p][:2])
        steps.append(f"The change from ${bill} is {bill} - {k * p} = ${bill - k * p}.")
        return (f"{name} buys {k} {items} at ${p} each and pays with a ${bill} bill. "
                f"How many dollars of change does {he} get?"), steps, bill - k * p
    k2, p2 = r.randint(2, 6), r.randint(2, 9)
    steps += [f"{k2} {items2} at ${p2} each cost {k2} * {p2} = ${k2 * p2}.",
              f"Altogether {he} spends {k * p} + {k2 * p2} = ${k * p + k2 * p2}."]
    return (f"{name} buys {k} {items} for ${p} each and {k2} {items2} for ${p2} each. "
            f"How much does {he} spend in total, in dollars?"), steps, k * p + k2 * p2


def _ages(r, a, b):
    x, ops = r.randint(4, 30), r.randint(1, 3)
    if ops == 1:
        d = r.randint(2, 15)
        return (f"{a[0]} is {x} years old. {b[0]} is {d} years older than {a[0]}. How old is {b[0]}?",
                [f"{b[0]} is {x} + {d} = {x + d} years old."], x + d)
    if ops == 2:
        x, k, y = r.randint(3, 14), r.randint(2, 4), r.randint(1, 10)
        return (f"{a[0]} is {x} years old, and {b[0]} is {k} times as old. "
                f"How old will {b[0]} be in {y} years?",
                [f"{b[0]} is {k} * {x} = {k * x} years old now.",
                 f"In {y} years {b[1]} will be {k * x} + {y} = {k * x + y}."], k * x + y)
    d = r.randint(1, x - 2)
    y = x - d
    return (f"{a[0]} is {x} years old. {b[0]} is {d} years younger than {a[0]}, and their cousin is "
            f"twice as old as {b[0]}. What is the sum of the three ages?",
            [f"{b[0]} is {x} - {d} = {y}.", f"The cousin is 2 * {y} = {2 * y}.",
             f"The sum is {x} + {y} + {2 * y} = {x + 3 * y}."], x + 3 * y)


def _speed(r, a, b):
    v, h, ops = r.choice(range(20, 130, 5)), r.randint(2, 6), r.randint(1, 3)
    if ops == 1:
        who = r.choice(["A train", "A car", "A bus", "A ferry"])
        return (f"{who} travels at {v} km per hour for {h} hours. How many kilometres does it travel?",
                [f"Distance = speed * time = {v} * {h} = {v * h} km."], v * h)
    if ops == 2:
        stop = r.randint(1, 3)
        return (f"{a[0]} drives {v * h} km at {v} km per hour and stops for {stop} hours on the way. "
                f"How many hours does the whole trip take?",
                [f"Driving takes {v * h} / {v} = {h} hours.",
                 f"With the stop: {h} + {stop} = {h + stop} hours."], h + stop)
    v2, h2 = r.choice(range(10, 30, 2)), r.randint(1, 4)
    return (f"{a[0]} cycles at {v2} km per hour for {h2} hours, then rides a bus at {v} km per hour "
            f"for {h} hours. How far does {a[1]} travel in total, in kilometres?",
            [f"Cycling: {v2} * {h2} = {v2 * h2} km.", f"Bus: {v} * {h} = {v * h} km.",
             f"Total: {v2 * h2} + {v * h} = {v2 * h2 + v * h} km."], v2 * h2 + v * h)


def _sharing(r, a, b):
    k, q, g, ops = r.randint(2, 8), r.randint(2, 12), r.randint(1, 9), r.randint(1, 3)
    thing = r.choice(["marbles", "stickers", "cookies", "cards", "strawberries", "pencils"])
    share = f"Each friend gets {k * q} / {k} = {q}."
    if ops == 1:
        return (f"{a[0]} has {k * q} {thing} and shares them equally among {k} friends. "
                f"How many does each friend get?", [share], q)
    if ops == 2:
        return (f"{a[0]} has {k * q + g} {thing}, gives {g} to {a[2]} brother and shares the rest "
                f"equally among {k} friends. How many does each friend get?",
                [f"After giving some away, {a[1]} has {k * q + g} - {g} = {k * q}.", share], q)
    p = r.choice([p for p in range(2, 7) if (k * q + g) % p == 0] or [1])
    return (f"{a[0]} buys {p} packs of {(k * q + g) // p} {thing}, keeps {g} and shares the rest "
            f"equally among {k} friends. How many does each friend get?",
            [f"{a[1].capitalize()} has {p} * {(k * q + g) // p} = {k * q + g}.",
             f"After keeping {g}, {k * q + g} - {g} = {k * q} are left.", share], q)


def _savings(r, a, b):
    s, w, ops = r.randint(3, 25), r.randint(2, 12), r.randint(1, 3)
    if ops == 1:
        return (f"{a[0]} saves ${s} every week. How many dollars has {a[1]} saved after {w} weeks?",
                [f"{s} * {w} = {s * w} dollars."], s * w)
    x = r.randint(1, s * w - 1)
    thing = r.choice(["a video game", "a jacket", "a gift for a friend", "concert tickets", "a skateboard"])
    steps = [f"In {w} weeks {a[1]} saves {s} * {w} = {s * w} dollars."]
    if ops == 2:
        steps.append(f"After spending: {s * w} - {x} = {s * w - x}.")
        return (f"{a[0]} saves ${s} every week for {w} weeks and then spends ${x} on {thing}. "
                f"How many dollars are left?"), steps, s * w - x
    start = r.randint(5, 60)
    steps += [f"With the piggy bank: {start} + {s * w} = {start + s * w}.",
              f"After spending: {start + s * w} - {x} = {start + s * w - x}."]
    return (f"{a[0]} has ${start} in a piggy bank, saves ${s} more every week for {w} weeks, then "
            f"spends ${x} on {thing}. How many dollars does {a[1]} have now?"), steps, start + s * w - x


def _reading(r, a, b):
    day, d, ops = r.randint(5, 30), r.randint(2, 9), r.randint(1, 3)
    if ops == 1:
        return (f"{a[0]} reads {day} pages a day. How many pages does {a[1]} read in {d} days?",
                [f"{day} * {d} = {day * d} pages."], day * d)
    if ops == 2:
        pages = day * d + r.randint(10, 200)
        return (f"A book has {pages} pages. {a[0]} reads {day} pages every day for {d} days. "
                f"How many pages are left?",
                [f"{a[1].capitalize()} reads {day} * {d} = {day * d} pages.",
                 f"{pages} - {day * d} = {pages - day * d} pages are left."], pages - day * d)
    pages = 3 * day + r.randint(10, 200)
    return (f"A book has {pages} pages. {a[0]} reads {day} pages on Monday and twice as many on "
            f"Tuesday. How many pages are still unread?",
            [f"On Tuesday {a[1]} reads 2 * {day} = {2 * day} pages.",
             f"In total {day} + {2 * day} = {3 * day} pages.",
             f"Unread: {pages} - {3 * day} = {pages - 3 * day} pages."], pages - 3 * day)


def _garden(r, a, b):
    rows, per, ops = r.randint(2, 9), r.randint(3, 12), r.randint(1, 3)
    plant = r.choice(["tomato", "pepper", "lettuce", "rose", "bean"])
    if ops == 1:
        return (f"A garden has {rows} rows with {per} {plant} plants in each row. "
                f"How many plants are there?", [f"{rows} * {per} = {rows * per} plants."], rows * per)
    dead = r.randint(1, rows * per - 1)
    left = rows * per - dead
    steps = [f"There are {rows} * {per} = {rows * per} plants.", f"{rows * per} - {dead} = {left} are left."]
    q = f"{a[0]} plants {rows} rows of {per} {plant} plants, but {dead} of them die."
    if ops == 2:
        return q + " How many plants are left?", steps, left
    f = r.randint(2, 6)
    steps.append(f"They give {left} * {f} = {left * f} {plant}s.")
    q += f" Each remaining plant gives {f} {plant}s. How many {plant}s does {a[1]} harvest?"
    return q, steps, left * f


def _bakery(r, a, b):
    m, n, p, ops = r.randint(5, 40), r.randint(5, 40), r.randint(2, 6), r.randint(2, 3)
    steps = [f"It sells {m} + {n} = {m + n} loaves.", f"It earns {m + n} * {p} = ${(m + n) * p}."]
    q = f"A bakery sells {m} loaves of bread in the morning and {n} in the afternoon, at ${p} per loaf."
    if ops == 2:
        return q + " How many dollars does it earn?", steps, (m + n) * p
    c = r.randint(1, (m + n) * p - 1)
    steps.append(f"The profit is {(m + n) * p} - {c} = ${(m + n) * p - c}.")
    return q + f" Flour cost ${c}. What is the profit in dollars?", steps, (m + n) * p - c


def _recipe(r, a, b):
    e, m, k = r.randint(2, 5), r.choice([6, 8, 10, 12]), r.randint(2, 6)
    return (f"A recipe needs {e} eggs for {m} muffins. How many eggs does {a[0]} need for {m * k} muffins?",
            [f"{m * k} muffins is {m * k} / {m} = {k} batches.",
             f"{k} batches need {k} * {e} = {k * e} eggs."], k * e)


def _practice(r, a, b):
    mins, w = r.choice(range(10, 65, 5)), r.randint(1, 4)
    act = r.choice(["practises the piano", "jogs", "studies Spanish", "draws"])
    return (f"{a[0]} {act} for {mins} minutes every day. How many minutes is that in {w} weeks?",
            [f"{w} weeks have {w} * 7 = {7 * w} days.", f"{mins} * {7 * w} = {mins * 7 * w} minutes."],
            mins * 7 * w)


_TEMPLATES = [_shopping, _ages, _speed, _sharing, _savings, _reading, _garden, _bakery, _recipe, _practice]


def arithmetic(n: int, seed: int = 0, split: str | None = None) -> list[dict]:
    """n distinct GSM8K-style word problems [{"prompt", "response", "answer"}], deterministic in
    (n, seed, split). A question belongs to "test" if its hash says so (1 in 5), otherwise to
    "train", so the two splits never share a question whatever the seeds; split=None takes both."""
    r, out, seen = random.Random(f"arithmetic:{split}:{seed}"), [], set()
    for _ in range(100 * n + 1000):
        if len(out) == n:
            return out
        a, b = r.sample(_NAMES, 2)  # two people: (name, he/she, his/her)
        q, steps, ans = r.choice(_TEMPLATES)(r, a, b)
        if q in seen or split not in (None, hash_split(q)):
            continue
        seen.add(q)
        response = "\n".join(steps) + f"\nThe final answer is {ans}."
        out.append({"prompt": q, "response": response, "answer": str(ans)})
    raise ValueError(f"arithmetic: could not draw {n} distinct problems")
