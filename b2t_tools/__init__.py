"""b2t-fairseq's tools: the ``b2t-*`` console commands, the analyses, the demo and the WMT recipe.

They stand beside the plugin (``b2t_fairseq``, the model fairseq loads) and import it only where they
build or load a model; the text-only ones (the WMT tokenizer and BPE stages, the results table) import
neither torch nor fairseq.
"""
