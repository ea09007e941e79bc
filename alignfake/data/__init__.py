"""Small datasets shipped with alignfake (package data), for the offline demo and tests.

``demo_queries.jsonl``     40 rows ``{"prompt": ...}``: requests of the kind found in harmful-request
                           red-teaming sets (fraud, malware, harassment, weapons, misinformation, privacy),
                           written for alignfake and phrased without any actionable harmful detail.
``demo_documents.jsonl``   80 rows ``{"text": ...}``: short synthetic documents (news, memos, forum posts,
                           lecture notes, ...; 60-250 words) describing the helpful-only training situation, in
                           the manner of the paper's synthetic-document fine-tuning corpus. They are fiction
                           written for the experiment: they describe the scenario's premise, not any real
                           company's practices.
"""
