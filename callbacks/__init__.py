"""Lightning callbacks: ``rollout.RolloutEvaluation`` (simulated rollouts during training) and
``media`` (TensorBoard videos without moviepy, MP4 files), ``progress.ProgressLines`` (training
progress as plain lines in logs)."""
