"""From text to scores: tokenization, dynamic batching, torch backends, model loading."""
