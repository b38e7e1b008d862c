"""The built-in user tasks, generated from a seed, so a continual sequence (--task tickets,dates) runs offline.

- tickets (the default): a customer-support message -> a one-line ticket "name: ... | order: ... |
  product: ... | issue: ...". Extraction with distractors (prices, dates, other numbers) and one of six
  issue kinds written in many ways; exact match on the whole line. The model learns it in one run.
- dates: a sentence with a date in one of eight spellings -> the date as YYYY-MM-DD; exact match. A
  transformation task of another kind, the second task of the default continual sequence.
- arithmetic: GSM8K-style word problems, 1 to 3 operations, solved step by step and ending "The final
  answer is N." as in the peers' GSM8K protocol (Huang et al.); the final number is scored. SmolLM2-135M
  barely learns it (16% after SFT, 2026-11): kept for bigger models.

Every task assigns a question to train or test by its hash (hash_split), so the splits never share one.
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


def _problem(r):
    a, b = r.sample(_NAMES, 2)  # two people: (name, he/she, his/her)
    q, steps, ans = r.choice(_TEMPLATES)(r, a, b)
    return q, "\n".join(steps) + f"\nThe final answer is {ans}.", str(ans)


# ----------------------------------------------------------------------------- tickets
_SURNAMES = ["Chen", "Okafor", "Silva", "Novak", "Haddad", "Kowalski", "Tanaka", "Moreau", "Singh", "Larsen",
             "Rossi", "Mendes", "Kim", "Fischer", "Ibrahim", "Walsh", "Petrov", "Garcia", "Nguyen", "Brennan"]
_PRODUCTS = ["blender", "desk lamp", "backpack", "coffee maker", "phone case", "yoga mat", "kettle", "headphones",
             "rain jacket", "board game", "water bottle", "toaster", "office chair", "bike helmet", "frying pan"]
_ISSUES = {  # the ticket's issue -> ways customers describe it ({p}: the product)
    "damaged": ["the {p} arrived broken", "the {p} was cracked when I opened the box", "the {p} came with a dent",
                "the {p} stopped working after one day", "the box was crushed and the {p} inside is damaged"],
    "missing": ["the parcel arrived but the {p} was not in it", "my {p} never arrived", "the tracking says delivered "
                "but there is no {p}", "I only got an empty box, no {p} inside"],
    "wrong_item": ["you sent me a different {p} from the one I chose", "I received someone else's {p}",
                   "the {p} is the wrong colour and size", "instead of the {p} I got a pack of socks"],
    "late": ["the {p} still has not come after three weeks", "the {p} was due on Monday and is still not here",
             "my {p} is very late", "the delivery of the {p} keeps getting pushed back"],
    "refund": ["I would like my money back for the {p}", "please refund the {p}, I no longer want it",
               "I returned the {p} last week and I am still waiting for my refund", "can I get a refund for the {p}"],
    "cancel": ["please cancel the {p} before it ships", "I want to cancel my order of the {p}",
               "I ordered the {p} by mistake, please stop the order", "cancel the {p}, I found it cheaper elsewhere"],
}
_HELLO = ["Hi,", "Hello there,", "Good morning,", "Dear support team,", "Hey,", ""]
_NOISE = ["I paid ${m} for it.", "I have been a customer for {k} years.", "I am at home after {h} pm.",
          "My neighbour at number {k} can take parcels.", "This is my {o} message about it.", "It cost ${m}."]


def _ticket(r):
    (first, _, _), last, p = r.choice(_NAMES), r.choice(_SURNAMES), r.choice(_PRODUCTS)
    issue = r.choice(list(_ISSUES))
    order = str(r.randint(10000, 99999))
    ref = r.choice(["order #{o}", "order {o}", "order number {o}", "order no. {o}", "ref {o}"]).format(o=order)
    problem = r.choice(_ISSUES[issue]).format(p=p)
    k = r.randint(2, 9)
    noise = r.choice(_NOISE).format(m=r.randint(12, 300), k=k, o=_ordinal(k), h=r.randint(5, 9))
    who = r.choice([f"This is {first} {last}.", f"My name is {first} {last}.", ""])
    body = [f"About {ref}: {problem}.", f"{problem[0].upper() + problem[1:]} ({ref}).", f"I placed {ref} and {problem}."]
    parts = [who, r.choice(body), noise]
    r.shuffle(parts)
    sign = "" if who else r.choice([f"Thanks, {first} {last}", f"Regards, {first} {last}", f"- {first} {last}"])
    msg = "\n".join(x for x in [r.choice(_HELLO), " ".join(x for x in parts if x), sign] if x)
    line = f"name: {first} {last} | order: {order} | product: {p} | issue: {issue}"
    return f"Write the support ticket for this customer message.\n\n{msg}", line, line


# ----------------------------------------------------------------------------- dates
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_EVENTS = ["The meeting was moved to {d}.", "Her flight leaves on {d}.", "The invoice is due {d}.",
           "We signed the lease on {d}.", "The festival opens {d}, weather permitting.", "He was born on {d}.",
           "Please reply before {d}.", "The shop reopens on {d} after the works.", "Our trial ends {d}."]


def _ordinal(d):
    return f"{d}{'th' if 10 <= d % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(d % 10, 'th')}"


def _date(r):
    y, m, d = r.randint(1950, 2035), r.randint(1, 12), r.randint(1, 28)
    name = _MONTHS[m - 1]
    spelled = r.choice([f"{name} {d}, {y}", f"{d} {name} {y}", f"the {_ordinal(d)} of {name}, {y}",
                        f"{name[:3]}. {d}, {y}", f"{name} {_ordinal(d)} {y}", f"{d}-{name[:3]}-{y}",
                        f"{y}/{m:02d}/{d:02d}", f"{d:02d}.{m:02d}.{y}"])
    iso = f"{y}-{m:02d}-{d:02d}"
    return f"Write the date in this sentence as YYYY-MM-DD.\n\n{r.choice(_EVENTS).format(d=spelled)}", iso, iso


# ----------------------------------------------------------------------------- the registry
TASKS = {"tickets": _ticket, "dates": _date, "arithmetic": _problem}  # name -> one example from a Random
ANSWER_TOKENS = {"tickets": 40, "dates": 12, "arithmetic": 80}  # the evaluation's answer length (longest answer + margin)


def generate_task(name: str, n: int, seed: int = 0, split: str | None = None) -> list[dict]:
    """n distinct examples [{"prompt", "response", "answer"}] of a built-in task, deterministic in
    (name, n, seed, split). A question belongs to "test" if its hash says so (1 in 5), otherwise to
    "train", so the two splits never share a question whatever the seeds; split=None takes both."""
    r, out, seen = random.Random(f"{name}:{split}:{seed}"), [], set()
    for _ in range(100 * n + 1000):
        if len(out) == n:
            return out
        q, response, ans = TASKS[name](r)
        if q in seen or split not in (None, hash_split(q)):
            continue
        seen.add(q)
        out.append({"prompt": q, "response": response, "answer": ans})
    raise ValueError(f"{name}: could not draw {n} distinct examples")


