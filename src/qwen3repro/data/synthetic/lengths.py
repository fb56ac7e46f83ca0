# Tiny lengths: the report's 4,096 (S1/S2) and 32,768 (S3) scaled down by 16; inference at 4× S3
# (the report's "four-fold increase ... during inference" with YaRN + DCA).
S1_SEQ_LEN = 256
S3_SEQ_LEN = 2048
INFERENCE_LEN = 4 * S3_SEQ_LEN
# Report §3.2: 75% of S3 text is 16,384-32,768 tokens (= [S3/2, S3]), 25% is 4,096-16,384 (= [S1, S3/2]).
S3_LONG_SHARE = 0.75
PASSKEY_EVAL_LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
