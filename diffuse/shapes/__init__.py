"""The shapes world the default model learns: scenes, their captions, the dataset, the judge that reads
an image back into a scene, the image tower the text encoder is trained against, and the evaluation."""
