"""qz-detection: INT8 quantizable detection models and the detection task of qz.

The models register through the ``qz.models`` entry point (``qz_detection.models``), the task through
``qz.tasks`` (``qz_detection.task:TASK``).
"""

__version__ = "0.1.0"
