"""Deployments beyond one machine, rendered from the same spec, plan and WAN
model as the one-machine cluster: Kubernetes manifests (``kubernetes``), Chaos
Mesh resources (``chaosmesh``), a compose file (``compose``); what they share
is ``model``. Pure generation: nothing here runs or reaches a cluster."""
