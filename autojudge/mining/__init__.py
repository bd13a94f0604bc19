"""AutoJudge mining: label draft/target mismatches as important or not by checking final answers."""
