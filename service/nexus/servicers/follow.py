"""nexus.v1.FollowService."""

from __future__ import annotations

import grpc

from nexus import queries, validation
from nexus.auth import acting_user
from nexus.database import Database
from nexus.errors import InvalidArgument
from nexus.pagination import PageTokens, time_key
from nexus.queries import Query
from nexus.v1 import follow_pb2 as pb
from nexus.v1 import follow_pb2_grpc


class FollowServicer(follow_pb2_grpc.FollowServiceServicer):
    def __init__(self, db: Database, page_tokens: PageTokens) -> None:
        self._db = db
        self._tokens = page_tokens

    async def _edge(self, query: Query, request: pb.FollowRequest | pb.UnfollowRequest) -> bool:
        """Follows or unfollows; returns whether the edge changed."""
        follower = acting_user(request.follower_id, "follower_id")
        followed = validation.user_id(request.followed_id, "followed_id")
        if follower == followed:
            raise InvalidArgument("followed_id", "a user cannot follow themselves")
        changed: bool = await self._db.fetchval(query, follower, followed)
        return changed

    async def Follow(self, request: pb.FollowRequest, context: grpc.aio.ServicerContext) -> pb.FollowResponse:
        return pb.FollowResponse(following=True, changed=await self._edge(queries.FOLLOW, request))

    async def Unfollow(self, request: pb.UnfollowRequest, context: grpc.aio.ServicerContext) -> pb.UnfollowResponse:
        return pb.UnfollowResponse(following=False, changed=await self._edge(queries.UNFOLLOW, request))

    async def GetFollowCounts(
        self, request: pb.GetFollowCountsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetFollowCountsResponse:
        user_ids = validation.user_ids(request.user_ids, "user_ids")
        rows = await self._db.fetch(queries.FOLLOW_COUNTS, user_ids)
        return pb.GetFollowCountsResponse(
            counts=[
                pb.FollowCounts(user_id=r["user_id"], follower_count=r["follower_count"], following_count=r["following_count"])
                for r in rows
            ]
        )

    async def GetFollowStates(
        self, request: pb.GetFollowStatesRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetFollowStatesResponse:
        user_id = validation.user_id(request.user_id, "user_id")
        others = validation.user_ids(request.other_user_ids, "other_user_ids")
        rows = await self._db.fetch(queries.FOLLOW_STATES, user_id, others)
        return pb.GetFollowStatesResponse(
            states=[pb.FollowState(user_id=r["user_id"], following=r["following"], followed_by=r["followed_by"]) for r in rows]
        )

    async def _list(
        self, query: Query, request: pb.ListFollowersRequest | pb.ListFollowingRequest
    ) -> tuple[list[str], str]:
        """One page of user ids, newest edge first, and the next page's token."""
        user_id = validation.user_id(request.user_id, "user_id")
        limit = validation.page_size(request.page_size)
        scope = (query.name, user_id)
        after_time, after_user = self._tokens.decode_time_key(scope, request.page_token)
        rows = await self._db.fetch(query, user_id, after_time, after_user, limit + 1)
        page, token = self._tokens.page(scope, rows, limit, lambda row: time_key(row["create_time"], row["user_id"]))
        return [r["user_id"] for r in page], token

    async def ListFollowers(
        self, request: pb.ListFollowersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListFollowersResponse:
        user_ids, token = await self._list(queries.LIST_FOLLOWERS, request)
        return pb.ListFollowersResponse(user_ids=user_ids, next_page_token=token)

    async def ListFollowing(
        self, request: pb.ListFollowingRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListFollowingResponse:
        user_ids, token = await self._list(queries.LIST_FOLLOWING, request)
        return pb.ListFollowingResponse(user_ids=user_ids, next_page_token=token)
