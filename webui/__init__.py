"""The fluxlora web UI (Gradio); reads run folders through fluxlora.rundir."""
