"""Writes a tiny top-6 ESFT folder for the command-line cases: 2 domains (law, math) x 2 layers x
40 lines of TOKENS tokens over 64 experts, seeded, so every run writes the same bytes.
Usage: tiny_esft.py FOLDER TOKENS"""
import os
import random
import sys

root, tokens = sys.argv[1], int(sys.argv[2])
rng = random.Random(5)
for dom in ("law", "math"):
    os.makedirs(os.path.join(root, dom), exist_ok=True)
    for layer in (1, 2):
        with open(os.path.join(root, dom, f"expert_weights_{layer}.txt"), "w") as f:
            for line in range(40):
                ids, ws = [], []
                for tok in range(tokens):
                    ids += rng.sample(range(64), 6)
                    ws += [round(rng.random(), 4) for _ in range(6)]
                f.write("\t".join(map(str, ids)) + "\t\t" + "\t".join(map(str, ws)) + "\n")
