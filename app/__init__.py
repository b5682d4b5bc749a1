"""Ray-free core of ray-rollout: config schemas, the V2 protocol, traffic choice, adapters.

Nothing in this package starts Ray; `app.builder` is the one module that imports the Serve
adapters in `deployments/`, and only when `build_app` is called.
"""

__version__ = "0.1.0"
