"""What lies between regions: the WAN model (``wan``: latency, jitter and
bandwidth per region pair) and the links (``links``: real TCP proxies that
shape inter-node traffic and carry link faults)."""
