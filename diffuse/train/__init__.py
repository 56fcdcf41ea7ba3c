"""Training diffuse's own small default model from scratch on a generated shapes world."""
