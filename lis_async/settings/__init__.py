"""Settings: every option the worker reads, declared once and validated once.

- ``model``: the settings model (pydantic): environment names, ``config.yml`` keys, types,
  defaults, bounds and descriptions; ``load_settings`` reads both sources.
- ``unsupported``: pycti's helper settings lis-async does not implement, refused with a reason.
- ``removed``: settings lis-async no longer reads: ignored, with a start-up warning naming each.
- ``tls``: the AMQPS context from pycti's ``MQ_USE_SSL_*`` settings (checked at load).
- ``reference``: what is generated from the model (docs/configuration.md, config.yml.sample,
  the OpenCTI catalog's ``__metadata__`` files), printed and written by ``lis-async settings``.
"""
