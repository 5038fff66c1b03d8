"""The zoomable slide viewer: Deep Zoom tiles from our own reader, served with the run's scores to OpenSeadragon."""

from .deepzoom import DeepZoom, TileOutOfRange
from .server import RunViewer, ViewerServer, main, serve

__all__ = ["DeepZoom", "RunViewer", "TileOutOfRange", "ViewerServer", "main", "serve"]
