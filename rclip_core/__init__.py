"""rclip: RegionCLIP (Zhong et al., CVPR 2022) re-implemented as a library.

The library never parses argv, prints, or does I/O at import time; ``rclip_cli`` is the command line on top of it.
"""

__version__ = "0.1.0"
