"""digital-worker: deploy and operate SGLang-served LLM assistants ("digital workers") on Kubernetes.

Subpackages live in the repository's top-level folders (see pyproject's package-dir):
``operator`` (kopf operator), ``runtime`` (SGLang launcher and simulator), ``agents`` (GPU node agent),
``stacks`` (Pulumi programs). Importing this package imports nothing heavy.
"""

__version__ = "0.1.0"
