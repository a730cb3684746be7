"""safeclip.export: turn a LLaVA checkpoint into a safeclip-edge bundle (needs the ``[export]`` extra)."""
