"""The shapes world the default model learns, and the measures of a model made for it.

scenes.py         the vocabulary (shapes, colours, sizes, positions, relations), a scene, its rendering
captions.py       scene -> caption in varied phrasings, caption -> the attributes it states
data.py           the endless seeded dataset, with combinations held out for evaluation
analyze.py        the judge: an image read back into a scene
image_encoder.py  CLIP's image side, small: what the text encoder is trained against
evaluate.py       `diffuse eval`: held-out prompt adherence, VAE reconstruction, caption retrieval
"""
