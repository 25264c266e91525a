"""Conditioning inputs of the models: prompts -> text embeddings, CLIP image features, body priors."""
