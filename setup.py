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
# T5X's own dependencies from the package registry, pinned to the set checked
# with T5X (github.com/google-research/t5x, installed from source: README,
# "Running under T5X"); T5X itself, airio and jestimator are not on the
# registry.
_T5X = [
    "jax==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "chex",
    "orbax-checkpoint==0.12.8",
    "tensorstore",
    "clu==0.0.12",
    "seqio==0.0.20",
    "tensorflow-cpu==2.21.0",
    "tensorboard",
    "tensorflow-datasets",
    "grain",
    "fiddle",
    "gin-config",
    "jaxtyping",
    "cached_property",
]
_TEST = [
    "pytest",
    "pytest-xdist>=3.8",  # --no-loadscope-reorder (pytest.ini)
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
    extras_require={"test": _TEST, "t5x": _T5X},
)
