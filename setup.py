"""Install flix (the library) and flix_tasks (SeqIO tasks, from tasks/)."""

import setuptools

_CORE = [
    "jax>=0.4.30",
    "flax>=0.8",
    "optax",
    "numpy",
    "gin-config",
    "absl-py",
    "orbax-checkpoint",
    "clu",
    "tensorboard",
    "msgpack",
    "tensorstore",
    "safetensors",
    "matplotlib",
]
_DATA = [
    "seqio",
    "tensorflow-cpu",
    "tensorflow-datasets",
    "num2words",
    "sacrebleu>=2.0",
]
_TEST = [
    "pytest",
    "pytest-xdist",
    "transformers",
    "torch==2.13.0",
    "peft",
    "accelerate",
    "pyink",
]

setuptools.setup(
    name="flix",
    version="0.1.0",
    description="FLix: Featurized Low-Rank Mixtures for multitask multilingual PEFT in JAX",
    packages=["flix", "flix_tasks"],
    package_dir={"flix": "flix", "flix_tasks": "tasks"},
    python_requires=">=3.10",
    install_requires=_CORE + _DATA,
    extras_require={"test": _TEST},
)
