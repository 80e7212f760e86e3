"""ComfyUI on rented GPUs: a ComfyUI API client, workflow checks, local SSH tunnels and their keeper."""
