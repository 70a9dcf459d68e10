"""Errors as data.

Every per-partition result on the wire carries an `ErrorCode` (proto/logbroker/v1/logbroker.proto).
This module maps each code to an exception class with two flags the clients act on:

- `retriable`: the same request may succeed later (leadership moving, a timeout).
- `refresh_metadata`: the client's view of the cluster is stale; refresh it before retrying.

The server side raises `BrokerError` subclasses internally and turns them back into codes at the
gRPC edge; the client side turns codes into exceptions with `error_for(code, message)`.
"""

from __future__ import annotations

from typing import ClassVar

from logbroker.v1 import logbroker_pb2 as pb

ErrorCode = pb.ErrorCode


class LogbrokerError(Exception):
    """Base of every error this package raises on purpose."""


class BrokerError(LogbrokerError):
    """An error with a wire `ErrorCode`."""

    code: ClassVar[int] = pb.UNKNOWN_SERVER_ERROR
    retriable: ClassVar[bool] = False
    refresh_metadata: ClassVar[bool] = False

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.__class__.__name__)
        self.message = message or self.__class__.__name__

    @property
    def code_name(self) -> str:
        return pb.ErrorCode.Name(self.code)

    def __str__(self) -> str:
        return f"{self.code_name}: {self.message}"


class UnknownServerError(BrokerError):
    code = pb.UNKNOWN_SERVER_ERROR


class OffsetOutOfRangeError(BrokerError):
    code = pb.OFFSET_OUT_OF_RANGE


class CorruptMessageError(BrokerError):
    code = pb.CORRUPT_MESSAGE


class UnknownTopicOrPartitionError(BrokerError):
    code = pb.UNKNOWN_TOPIC_OR_PARTITION
    retriable = True
    refresh_metadata = True


class InvalidFetchSizeError(BrokerError):
    code = pb.INVALID_FETCH_SIZE


class LeaderNotAvailableError(BrokerError):
    code = pb.LEADER_NOT_AVAILABLE
    retriable = True
    refresh_metadata = True


class NotLeaderOrFollowerError(BrokerError):
    code = pb.NOT_LEADER_OR_FOLLOWER
    retriable = True
    refresh_metadata = True


class RequestTimedOutError(BrokerError):
    code = pb.REQUEST_TIMED_OUT
    retriable = True


class MessageTooLargeError(BrokerError):
    code = pb.MESSAGE_TOO_LARGE


class InvalidTopicError(BrokerError):
    code = pb.INVALID_TOPIC


class RecordListTooLargeError(BrokerError):
    code = pb.RECORD_LIST_TOO_LARGE


class NotEnoughReplicasError(BrokerError):
    code = pb.NOT_ENOUGH_REPLICAS
    retriable = True


class NotEnoughReplicasAfterAppendError(BrokerError):
    code = pb.NOT_ENOUGH_REPLICAS_AFTER_APPEND
    retriable = True


class InvalidRequiredAcksError(BrokerError):
    code = pb.INVALID_REQUIRED_ACKS


class InvalidTimestampError(BrokerError):
    code = pb.INVALID_TIMESTAMP


class TopicAlreadyExistsError(BrokerError):
    code = pb.TOPIC_ALREADY_EXISTS


class InvalidPartitionsError(BrokerError):
    code = pb.INVALID_PARTITIONS


class InvalidReplicationFactorError(BrokerError):
    code = pb.INVALID_REPLICATION_FACTOR


class InvalidConfigError(BrokerError):
    code = pb.INVALID_CONFIG


class InvalidRequestError(BrokerError):
    code = pb.INVALID_REQUEST


class UnsupportedForMessageFormatError(BrokerError):
    code = pb.UNSUPPORTED_FOR_MESSAGE_FORMAT


class StorageError(BrokerError):
    """Disk full or an I/O error: the replica cannot take writes."""

    code = pb.KAFKA_STORAGE_ERROR
    retriable = True


class FencedLeaderEpochError(BrokerError):
    code = pb.FENCED_LEADER_EPOCH
    retriable = True
    refresh_metadata = True


class UnknownLeaderEpochError(BrokerError):
    code = pb.UNKNOWN_LEADER_EPOCH
    retriable = True
    refresh_metadata = True


class OffsetNotAvailableError(BrokerError):
    code = pb.OFFSET_NOT_AVAILABLE
    retriable = True


class UnknownMemberIdError(BrokerError):
    code = pb.UNKNOWN_MEMBER_ID


class InvalidGroupIdError(BrokerError):
    code = pb.INVALID_GROUP_ID


class BrokerNotAvailableError(BrokerError):
    code = pb.BROKER_NOT_AVAILABLE
    retriable = True
    refresh_metadata = True


class StaleControllerEpochError(BrokerError):
    """A request from a controller that has since been replaced (zombie-controller fence)."""

    code = pb.STALE_CONTROLLER_EPOCH


class NotControllerError(BrokerError):
    code = pb.NOT_CONTROLLER
    retriable = True
    refresh_metadata = True


class ReassignmentInProgressError(BrokerError):
    code = pb.REASSIGNMENT_IN_PROGRESS
    retriable = True


class StaleBrokerEpochError(BrokerError):
    """A request aimed at an earlier incarnation of the receiving broker."""

    code = pb.STALE_BROKER_EPOCH


class IneligibleReplicaError(BrokerError):
    code = pb.INELIGIBLE_REPLICA


class GroupMaxSizeReachedError(BrokerError):
    code = pb.GROUP_MAX_SIZE_REACHED


class FencedMemberEpochError(BrokerError):
    """The member must drop its partitions and rejoin (a zombie, or a lost session)."""

    code = pb.FENCED_MEMBER_EPOCH


class StaleMemberEpochError(BrokerError):
    code = pb.STALE_MEMBER_EPOCH
    retriable = True


class InvalidRegularExpressionError(BrokerError):
    code = pb.INVALID_REGULAR_EXPRESSION


class CoordinatorLoadInProgressError(BrokerError):
    """The coordinator is rebuilding its groups from __consumer_offsets: retry shortly."""

    code = pb.COORDINATOR_LOAD_IN_PROGRESS
    retriable = True


class CoordinatorNotAvailableError(BrokerError):
    """The group's __consumer_offsets partition has no leader (yet): find the coordinator again."""

    code = pb.COORDINATOR_NOT_AVAILABLE
    retriable = True
    refresh_metadata = True


class NotCoordinatorError(BrokerError):
    """This broker does not coordinate the group (any more): find the coordinator again."""

    code = pb.NOT_COORDINATOR
    retriable = True
    refresh_metadata = True


class NonEmptyGroupError(BrokerError):
    code = pb.NON_EMPTY_GROUP


class GroupIdNotFoundError(BrokerError):
    code = pb.GROUP_ID_NOT_FOUND


class InvalidRecordError(BrokerError):
    """A record the topic's config refuses: a null key in a cleanup_policy=compact topic."""

    code = pb.INVALID_RECORD


class InconsistentGroupProtocolError(BrokerError):
    """A share-group call for the id of a consumer group, or the other way round."""

    code = pb.INCONSISTENT_GROUP_PROTOCOL


class InvalidRecordStateError(BrokerError):
    """Settling a record this share-group member does not hold (settled already, or its lock lost)."""

    code = pb.INVALID_RECORD_STATE


class UnsupportedCompressionTypeError(BrokerError):
    """A batch whose codec the broker cannot read where it must read the records: snappy, lz4 or
    zstd produced to a cleanup_policy=compact topic (whose keys are checked and compacted)."""

    code = pb.UNSUPPORTED_COMPRESSION_TYPE


class InvalidFilterError(BrokerError):
    """A filter expression that does not parse (with the parser's message), is longer than the
    bound or calls a function not on the allow-list (logbroker/group/record_filter.py)."""

    code = pb.INVALID_FILTER


class TopicAuthorizationFailedError(BrokerError):
    """The principal may not perform the operation on this topic (the ACLs of logbroker/security/acl.py)."""

    code = pb.TOPIC_AUTHORIZATION_FAILED


class SecurityConfigInvalidError(BrokerError):
    """A malformed ACL or user credential; the message names the field."""

    code = pb.SECURITY_CONFIG_INVALID


class InvalidPriorityError(BrokerError):
    """A record priority outside 0..priority_levels-1 of its topic (cluster/priority_levels.py):
    nothing of it is written."""

    code = pb.INVALID_PRIORITY


class UnknownReplyToError(BrokerError):
    """A reply whose reply_to names no broker, or no reply stream open on the broker named (the
    requester has gone, or never was)."""

    code = pb.UNKNOWN_REPLY_TO


class ReplyTooLargeError(BrokerError):
    """A reply over the broker's bound on a reply's key, value and headers (1 MiB)."""

    code = pb.REPLY_TOO_LARGE


class UnauthenticatedError(BrokerError):
    """The broker did not accept who the client is: its TLS handshake was refused (no client
    certificate where one is required, one not signed by a CA the broker trusts, an expired one) or
    the broker's certificate is not trusted by the client. Final: retrying sends the same certificate."""

    code = pb.UNAUTHENTICATED


class OutOfOrderSequenceNumberError(BrokerError):
    """An idempotent producer's batch does not follow the last batch the partition holds from it
    (a gap: the batches between were lost), or starts a new producer epoch at a sequence other
    than 0. Final for the batch: the producer cannot make the gap go away by retrying."""

    code = pb.OUT_OF_ORDER_SEQUENCE_NUMBER


class DuplicateSequenceNumberError(BrokerError):
    """A batch the partition already holds, resent in a request of several batches for the
    partition (a single resent batch is answered with its original offsets instead)."""

    code = pb.DUPLICATE_SEQUENCE_NUMBER


class InvalidProducerEpochError(BrokerError):
    """The producer id's epoch is older than its current one: a newer producer with the same
    producer_name fenced this one (a zombie). Final."""

    code = pb.INVALID_PRODUCER_EPOCH


class PartitionCountChangedError(BrokerError):
    """The topic has grown and the batch holds a key that hashes to another partition now: the
    producer partitioned it by the old count. Its records are refused (so no record of a moved key
    lands in the old partition after the split offset, cluster/lineage.py); the producer refreshes
    metadata and sends them again, each to its key's new partition (client/producer/reroute.py).
    A record's future fails with it only when the user chose its partition, or it was refused again
    after a re-route."""

    code = pb.PARTITION_COUNT_CHANGED
    refresh_metadata = True


class KafkaTimeoutError(LogbrokerError):
    """A client-side deadline passed (delivery timeout, flush timeout, metadata wait)."""


class PermissionDeniedError(LogbrokerError):
    """The broker refused the whole call: the principal may not perform it (ACLs). Final."""

    retriable: ClassVar[bool] = False


class RequestTimeoutError(KafkaTimeoutError):
    """A request (Requester.request) got no reply before its timeout; the message names the topic."""


class BrokerUnavailableError(LogbrokerError):
    """No broker could be reached at the bootstrap or leader address."""

    retriable = True


class BrokerOverloadedError(LogbrokerError):
    """The broker refused the whole call for overload (RESOURCE_EXHAUSTED with a retry-after hint:
    logbroker/server/admission.py). Retriable, no earlier than `retry_after_ms`; nothing was done."""

    retriable = True

    def __init__(self, message: str, retry_after_ms: int = 0) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


_BY_CODE: dict[int, type[BrokerError]] = {
    cls.code: cls
    for cls in list(BrokerError.__subclasses__())
}


def error_for(code: int, message: str = "") -> BrokerError:
    """The exception for a wire error code (UnknownServerError for codes this client does not know)."""
    cls = _BY_CODE.get(code, UnknownServerError)
    err = cls(message)
    if cls is UnknownServerError and code != pb.UNKNOWN_SERVER_ERROR:
        err.message = f"error code {code}: {message}"
    return err
