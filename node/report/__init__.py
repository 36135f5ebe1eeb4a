"""Reports: content as plain values, SR/KOS building, storage and delivery to PACS."""
