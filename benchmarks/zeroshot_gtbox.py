"""GT-box zero-shot: `rclip zeroshot --gt-boxes` against the plain eager path, 100 ground-truth boxes per 640×480
image (resized to 1067×800 as the command does).

    python benchmarks/zeroshot_gtbox.py [--quick] [--variant RN50|RN50x4] [--images 3] [--regions 100]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _zeroshot import main  # noqa: E402

if __name__ == "__main__":
    main("gt", default_boxes=100)
