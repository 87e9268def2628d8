"""Who may do what on a node's data plane: the Docker token grammar (``scopes``),
ACR's permission model (``permissions``), the identities a node consults
(``identities``), signed tokens (``tokens``) and the decision for one request
(``gate``). No HTTP here: ``registry_node.api.auth`` adapts it to aiohttp."""
