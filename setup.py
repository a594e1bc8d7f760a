from setuptools import find_packages, setup

setup(
    name="b2t-fairseq",
    version="0.1.0",
    description="B2T connection (Takase et al., Findings of ACL 2023) for fairseq: Post-LN, Pre-LN and B2T "
                "transformers, WMT En-De recipes, demo and benchmarks",
    packages=find_packages(include=["b2t_fairseq", "b2t_fairseq.*"]),
    python_requires=">=3.9",
    # torch and fairseq-fixed are installed first by scripts/setup-env.sh (order matters: see README)
    install_requires=["fairseq-fixed>=0.12.3", "torch>=2.0", "sacrebleu>=2.0", "sentencepiece"],
    entry_points={
        "console_scripts": [
            "b2t-train = b2t_fairseq.cli:train",
            "b2t-generate = b2t_fairseq.cli:generate",
            "b2t-interactive = b2t_fairseq.cli:interactive",
            "b2t-validate = b2t_fairseq.cli:validate",
            "b2t-hydra-train = b2t_fairseq.cli:hydra_train",
        ],
    },
)
