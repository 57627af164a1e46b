"""Stable machine-readable problem codes reported by validation (``Problem.code``).

Scripts and front ends match on these strings; never rename one, only add.
"""

BAD_DOCUMENT = "bad_document"  # not JSON / wrong shape / wrong format version
UNKNOWN_NODE_TYPE = "unknown_node_type"
UNKNOWN_INPUT = "unknown_input"
MISSING_INPUT = "missing_input"
DANGLING_LINK = "dangling_link"  # link to a node id that does not exist
UNKNOWN_OUTPUT = "unknown_output"  # link to an output name the source node does not have
TYPE_MISMATCH = "type_mismatch"
WRONG_TYPE = "wrong_type"  # literal of the wrong Python/JSON type
OUT_OF_BOUNDS = "out_of_bounds"
NOT_IN_CHOICES = "not_in_choices"
LINK_REQUIRED = "link_required"  # literal given where only a link makes sense (IMAGE, MODEL, ...)
CYCLE = "cycle"
NO_OUTPUT_NODE = "no_output_node"
BAD_PARAMETER = "bad_parameter"
FILE_NOT_FOUND = "file_not_found"
UNSAFE_PATH = "unsafe_path"
CHECK_FAILED = "check_failed"  # a node's own input check (or file fingerprint) raised an error
OVER_BUDGET = "over_budget"  # the workflow's memory estimate exceeds the budget (--memory-budget)
IMAGE_TOO_LARGE = "image_too_large"  # an input image has more pixels than the limit (read from its header)
PICKLE_CHECKPOINT = "pickle_checkpoint"  # a model file is a pickle, refused; the message says how to convert it
BAD_MODEL = "bad_model"  # a model file is damaged or its header, metadata or config is wrong
DEVICE_UNAVAILABLE = "device_unavailable"  # the device asked for (cuda, mps) is not on this machine
INPUT_MISMATCH = "input_mismatch"  # an input file named in a re-run PNG differs from the one it was made with
MODEL_LIMITS = "model_limits"  # warning: a prompt word or size outside what the bundled models were trained on
