# A realistic heap for `make bench`: an app holding JSON documents, parsed (dicts of strings and
# numbers) and as text, until its resident memory reaches MIB MiB. Then, like the counter, it
# appends "1" to FILE (kept open) and waits: its images stay restorable while it sleeps.
import json
import random
import sys
import time

mib, path = int(sys.argv[1]), sys.argv[2]
rnd = random.Random(1)
words = ("alpha bravo charlie delta echo foxtrot golf hotel india juliett kilo lima mike november "
         "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()
docs, texts = [], []


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


i = 0
while rss() < mib << 20:
    for _ in range(5000):
        d = {
            "id": i,
            "user": "user-%06d" % rnd.randrange(10**6),
            "email": "%s.%s@example.com" % (rnd.choice(words), rnd.choice(words)),
            "score": round(rnd.random() * 100, 3),
            "active": rnd.random() < 0.7,
            "tags": rnd.sample(words, 3),
            "text": " ".join(rnd.choices(words, k=12)),
            "count": rnd.randrange(10**9),
            "history": [{"t": 1700000000 + rnd.randrange(10**7), "v": rnd.random()} for _ in range(3)],
        }
        if i % 3 == 0:
            texts.append(json.dumps(d))
        else:
            docs.append(json.loads(json.dumps(d)))
        i += 1

out = open(path, "a")
out.write("1\n")
out.flush()
while True:
    time.sleep(3600)
