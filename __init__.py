"""ComfyUI entry point of the Side-Step node pack (nodes are added in nodes/; the core lives in sidestep_core/)."""

WEB_DIRECTORY = "./web"
