"""Zero-shot on proposals: `rclip zeroshot --proposals FILE` against the plain eager path, 1000 proposals per
640×480 image (an RPN's test-time count; given as a file, so both paths classify the very same boxes and the RPN's
own time, measured by rpn_proposals.py, stays out of the ratio).

    python benchmarks/zeroshot_proposals.py [--quick] [--variant RN50|RN50x4] [--images 3] [--regions 1000]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _zeroshot import main  # noqa: E402

if __name__ == "__main__":
    main("proposals", default_boxes=1000)
