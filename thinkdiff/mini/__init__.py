"""ThinkDiff in miniature: the mini-CoBSAT world and the parts ThinkDiff used pretrained, trained here from nothing."""
