"""Diffusion training pieces shared by the diffusion families (DiT, UNet): schedules, targets,
samplers (issue 13, in progress)."""
