"""The ``rclip`` command line: thin commands over :mod:`rclip_core`."""
