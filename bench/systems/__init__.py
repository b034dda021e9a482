"""The three systems measured: the bare pyvips limit, imgserve and thumbor."""
