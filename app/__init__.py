"""The sae-cafe Streamlit viewer (``sae-cafe view [PATH]``): latents, images, concept graphs, metrics."""
