"""The converter, written once for every model family: the commands (converter), the plan and checks
(plan), Hugging Face and Megatron checkpoint I/O, the precision check, PEFT export and in-memory
conversion (convert). A family only gives its converter spec (:mod:`mm_omni.checkpoint.spec`)."""
