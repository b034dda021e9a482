"""imgserve's benchmark: imgserve vs the bare pyvips limit vs thumbor (``python -m bench``)."""
