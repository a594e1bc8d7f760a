"""The WikiText-103 language-model recipe: prepare (text only: no torch at import), train, evaluate."""
