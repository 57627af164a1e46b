"""Stable machine-readable problem codes reported by validation (``Problem.code``).

Scripts and front ends match on these strings; never rename one, only add. :data:`CODES` is the
one table of them with what each means; the documentation's page of codes
(``docs/reference/errors.md``) is generated from it by ``scripts/gen_docs.py``, and a test fails
until the page is regenerated after a code is added (a constant and a row, here).
"""

BAD_DOCUMENT = "bad_document"
UNKNOWN_NODE_TYPE = "unknown_node_type"
UNKNOWN_INPUT = "unknown_input"
MISSING_INPUT = "missing_input"
DANGLING_LINK = "dangling_link"
UNKNOWN_OUTPUT = "unknown_output"
TYPE_MISMATCH = "type_mismatch"
WRONG_TYPE = "wrong_type"
OUT_OF_BOUNDS = "out_of_bounds"
NOT_IN_CHOICES = "not_in_choices"
LINK_REQUIRED = "link_required"
CYCLE = "cycle"
NO_OUTPUT_NODE = "no_output_node"
BAD_PARAMETER = "bad_parameter"
FILE_NOT_FOUND = "file_not_found"
NOT_A_FILE = "not_a_file"
UNSAFE_PATH = "unsafe_path"
BAD_FILE_NAME = "bad_file_name"
OUTPUT_NOT_WRITABLE = "output_not_writable"
INVALID_TEXT = "invalid_text"
TOO_DEEP = "too_deep"
CHECK_FAILED = "check_failed"
OVER_BUDGET = "over_budget"
IMAGE_TOO_LARGE = "image_too_large"
PICKLE_CHECKPOINT = "pickle_checkpoint"
BAD_MODEL = "bad_model"
DEVICE_UNAVAILABLE = "device_unavailable"
INPUT_MISMATCH = "input_mismatch"
MODEL_LIMITS = "model_limits"
PICKLE_REFUSED = "pickle_refused"
BAD_TENSOR = "bad_tensor"
ZIP_BOMB = "zip_bomb"

CODES: dict[str, str] = {
    BAD_DOCUMENT: "not a workflow: not JSON or a PNG with one, wrong shape, wrong format version, "
    "a malformed link, a number too long to handle",
    UNKNOWN_NODE_TYPE: "no installed node type has this name (the closest names are suggested)",
    UNKNOWN_INPUT: "the node type has no input of this name",
    MISSING_INPUT: "a required input is neither given nor linked",
    DANGLING_LINK: "a link names a node id that is not in the workflow",
    UNKNOWN_OUTPUT: "a link names an output the source node does not have",
    TYPE_MISMATCH: "a link joins an output and an input of different socket types",
    WRONG_TYPE: "a literal of the wrong type (text where a number goes, ...)",
    OUT_OF_BOUNDS: "a number outside the input's range (also a `--set` value)",
    NOT_IN_CHOICES: "a value that is not one of the input's choices (sampler, schedule, ...)",
    LINK_REQUIRED: "a literal given for an input that only takes a link (IMAGE, MODEL, ...)",
    CYCLE: "links that form a cycle (the nodes on it are named)",
    NO_OUTPUT_NODE: "nothing to run: no output node, or a requested output node is missing",
    BAD_PARAMETER: "a `--set` name the workflow does not declare, or a parameter that targets "
    "a missing node or input, or a linked input",
    FILE_NOT_FOUND: "a named input file, model or workflow file does not exist",
    NOT_A_FILE: "a named file is a folder, device, FIFO or socket rather than a regular file",
    UNSAFE_PATH: "a file name that leaves its folder (absolute, `..`, a link pointing outside)",
    BAD_FILE_NAME: "an output file name prefix that is not portable (empty, too long, a leading "
    "dot, `~`, control or reserved characters, `.` or `..`)",
    OUTPUT_NOT_WRITABLE: "the output folder is a file, lies under a file, or cannot be written",
    INVALID_TEXT: "text that is not valid Unicode (a lone surrogate) in an id, name or value",
    TOO_DEEP: "values nested deeper than the format allows (metadata, literals)",
    CHECK_FAILED: "a node's own input check raised an error (a bug in that node, named)",
    OVER_BUDGET: "the workflow's memory or disk estimate exceeds its budget (`--memory-budget`, "
    "`--disk-budget`), or a batch is larger than `--max-rows`; the node and the figure are named",
    IMAGE_TOO_LARGE: "an input image has more pixels than the limit (`--max-image-pixels`), read from "
    "its header before decoding",
    PICKLE_CHECKPOINT: "a model file is a pickle, refused; the message says how to convert it",
    BAD_MODEL: "a model file is damaged, or its header, metadata or config is wrong (the file and "
    "cause are named)",
    DEVICE_UNAVAILABLE: "the device asked for (cuda, mps) is not on this machine",
    INPUT_MISMATCH: "an input file named in a re-run PNG differs from the one it was made with",
    MODEL_LIMITS: "warning: a prompt word or image size outside what the bundled models were trained on, or a "
    "sampler, cfg and step count that draw part of the prompts wrong on them",
    PICKLE_REFUSED: "`convert`: the pickle names a global outside the allow-list or forges an object's "
    "state (BUILD); named, nothing executed",
    BAD_TENSOR: "`convert`: a tensor's size, stride or offset is impossible, reaches outside its storage, "
    "or expands one stored value into many (stride 0)",
    ZIP_BOMB: "`convert`: a zip entry or the weights would inflate far beyond what the file declares; "
    "refused before inflating",
}
