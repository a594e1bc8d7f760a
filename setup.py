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
            "b2t-demo = b2t_fairseq.demo:main",
            "b2t-grad-norms = b2t_fairseq.grad_norms:main",
            "b2t-bench = b2t_fairseq.bench:main",
            "b2t-average-checkpoints = b2t_fairseq.average_checkpoints:main",
            "b2t-import-checkpoint = b2t_fairseq.commands.import_checkpoint:main",
            "b2t-wmt-prepare = b2t_fairseq.wmt.prepare:main",
            "b2t-wmt-evaluate = b2t_fairseq.wmt.evaluate:main",
            "b2t-results-table = b2t_fairseq.wmt.results_table:main",
        ],
    },
)
