import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(r'^__version__ = "([^"]+)"', Path(__file__).with_name("b2t_fairseq").joinpath(
    "__init__.py").read_text(), re.M).group(1)  # the one place the version is written

setup(
    name="b2t-fairseq",
    version=VERSION,
    description="B2T connection (Takase et al., Findings of ACL 2023) for fairseq: Post-LN, Pre-LN and B2T "
                "transformers, WMT En-De recipes, demo and benchmarks",
    # hydra_plugins/ is Hydra's namespace for plugins it imports at start-up: the configs' resolver for
    # plain fairseq-hydra-train (b2t-hydra-train registers it itself). package_dir "" = "." makes an
    # editable install a plain path entry: Hydra lists hydra_plugins/ with pkgutil, which sees nothing
    # through setuptools' import-hook finder, so the resolver would be missing from `pip install -e .`.
    package_dir={"": "."},
    packages=find_packages(include=["b2t_fairseq", "b2t_fairseq.*", "b2t_tools", "b2t_tools.*"])
    + ["hydra_plugins.b2t_fairseq_resolvers"],
    license="MIT",
    # 3.8-3.10 for upstream fairseq 0.12.2; the pinned fresh route (scripts/setup-env.sh) needs >= 3.11
    python_requires=">=3.8",
    # fairseq and torch are NOT required: a user's environment already has a fairseq (upstream 0.12.2 or
    # fairseq-fixed) and a torch built for its CUDA. Requiring either would install fairseq-fixed over
    # upstream fairseq (two distributions owning fairseq/) or replace the cluster's torch. Without a
    # fairseq, `import b2t_fairseq` says so in one line. `pip install b2t-fairseq[fixed]` brings both.
    install_requires=[
        "sacrebleu>=2.0", "sentencepiece",          # b2t-demo, b2t-wmt-evaluate
        "sacremoses>=0.1,<0.2", "subword-nmt", "regex",  # b2t-wmt-prepare (0.2 dropped the nonbreaking-prefix files it reads)
        "matplotlib",                               # b2t-demo, b2t-grad-norms plots
    ],
    extras_require={
        "fixed": ["fairseq-fixed>=0.12.3", "torch>=2.0"],  # a fresh environment (see scripts/setup-env.sh)
        "test": ["pytest>=8"],
        "tensorboard": ["tensorboardX"],
    },
    entry_points={
        "console_scripts": [
            "b2t-train = b2t_tools.commands.cli:train",
            "b2t-generate = b2t_tools.commands.cli:generate",
            "b2t-interactive = b2t_tools.commands.cli:interactive",
            "b2t-validate = b2t_tools.commands.cli:validate",
            "b2t-eval-lm = b2t_tools.commands.cli:eval_lm",
            "b2t-hydra-train = b2t_tools.commands.cli:hydra_train",
            "b2t-torchrun-train = b2t_tools.commands.torchrun_train:main",
            "b2t-average-checkpoints = b2t_tools.commands.average_checkpoints:main",
            "b2t-demo = b2t_tools.demo.cli:main",
            "b2t-grad-norms = b2t_tools.analysis.grad_norms:main",
            "b2t-bench = b2t_tools.analysis.bench:main",
            "b2t-stability = b2t_tools.analysis.stability:main",
            "b2t-import-checkpoint = b2t_tools.commands.import_checkpoint:main",
            "b2t-export = b2t_tools.commands.export:main",
            "b2t-wmt-prepare = b2t_tools.wmt.prepare:main",
            "b2t-wmt-train = b2t_tools.wmt.train:main",
            "b2t-wmt-evaluate = b2t_tools.wmt.evaluate:main",
            "b2t-results-table = b2t_tools.wmt.results_table:main",
            "b2t-lm-prepare = b2t_tools.lm.prepare:main",
            "b2t-lm-train = b2t_tools.lm.train:main",
            "b2t-lm-evaluate = b2t_tools.lm.evaluate:main",
        ],
    },
)
