"""The model: layer builders (``layers``), the build loop, the Network and its Keras-style summary (``network``)."""

from fcclass.model.network import LayerInfo, Network, Summary, build_model

__all__ = ["LayerInfo", "Network", "Summary", "build_model"]
