"""The SGLang side of a digital worker: what runs in (or stands in for) the serving pod.

- `contract`: the launch config the operator renders and the one function that turns it into
  SGLang's argv (pinned SGLang version, allow-listed extra args, validation).
- `launcher`: the container entrypoint (`digital-worker runtime launch`): fetch, key handover,
  SIGTERM forwarding, exit codes. `sglang_entry`: SGLang's own entrypoint plus the API key.
- `modelfetch`: hf://, s3://, pvc:// into the model cache (resumable, verified, atomic).
- `sim`: an SGLang-compatible simulated server on `perfmodel`, with `sglang_metrics`.
- `image`: the serving image (SGLang's image plus the launcher) through the docker SDK.

Importable without kopf, statsmodels or pulumi; clients (docker, boto3, huggingface_hub) load lazily.
"""
