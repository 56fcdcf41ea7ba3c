"""The emoji world: named pictures, alone or in pairs, placed and sized as a caption asks.

source.py      `diffuse data emoji`: the pinned picture set fetched, checked and unpacked into a
               data folder, with its hashes and licences (the pictures are never committed)
catalogue.py   the pictures a data folder holds: names, categories, image files
scenes.py      a scene (pictures at the shapes world's positions, two sizes, a background), its rendering
captions.py    scene -> caption, caption -> the names, positions and relation it states
data.py        the endless seeded dataset, with picture positions and pairings held out
judge.py       the judge: pictures found against the background, each named by a small CNN, its
               cell and size read from its drawn bounds; judge_train.py trains it on augmented renders
evaluate.py    held-out prompt adherence by category, scored by the judge
"""
